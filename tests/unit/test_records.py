"""An earlier run's measured stage costs: taken from the newest comparable run record in the output, else none."""

from __future__ import annotations

import json

import pytest

from ifbatch.configs import load_config
from ifbatch.tasks.outputs.records import measured_costs
from ifbatch.tasks.storage import locate


def record(run_id, cfg, gpus=2, rate=1.0, done=20, per=None):
    return {
        "run_id": run_id,
        "config": cfg.model_dump(mode="json"),
        "plan": {"mode": "auto", "gpus": gpus},
        "steady_rows_per_second": rate,
        "counts": {"done": done},
        "stage_seconds_per_image": per or {"text_encoder": 0.01, "stage_1": 1.0, "stage_2": 1.0, "stage_3": 2.0},
    }


def write(tmp_path, rec):
    (tmp_path / "runs").mkdir(exist_ok=True)
    (tmp_path / "runs" / f"{rec['run_id']}.json").write_text(json.dumps(rec))


def test_the_newest_comparable_run_gives_gpu_seconds_split_by_its_stage_shares(tmp_path):
    cfg = load_config("if-xl")
    loc = locate(str(tmp_path))
    assert measured_costs(loc, cfg) is None  # no runs/ yet
    write(tmp_path, record("20261101T000000Z-a", cfg))
    write(tmp_path, record("20261102T000000Z-b", load_config("if-xl", ["stage_1.steps=50"])))  # other work
    write(tmp_path, record("20261102T120000Z-k", load_config("if-xl", ["data.candidates_per_image=4"])))  # as well
    write(tmp_path, record("20261103T000000Z-c", cfg, done=4))  # too few images for 2 GPUs
    (tmp_path / "runs" / "20261104T000000Z-d.json").write_text("{not json")  # damaged: not a measurement
    costs, by = measured_costs(loc, cfg)
    assert "20261101T000000Z-a" in by and "20 images on 2 GPUs" in by
    # 2 GPUs / 1.0 images/s = 2 GPU-seconds per image, in the shares 0.01 : 1 : 1 : 2
    assert costs["stage_3"] == pytest.approx(2 * 2.0 / 4.01) and sum(costs.values()) == pytest.approx(2.0)
