"""Best of k (data.candidates_per_image) and the score filter (data.min_clip_score) on the run engine with the
local executor: the same stage classes the Ray stream runs. Every stage at batch 1, so that an image does not
depend on its batch mates (across batch sizes a row agrees within float32 rounding, not bit for bit) and a rerun or
a resume can be compared byte for byte."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ifbatch.configs import load_config
from ifbatch.configs.schema import STAGES
from ifbatch.tasks.outputs.drift import SettingsChanged
from ifbatch.tasks.outputs.formats import read_image
from ifbatch.tasks.outputs.manifest import read_manifest
from ifbatch.tasks.storage import locate

from ..helpers import SMALL, write_table
from .local import run_local

pytestmark = pytest.mark.slow

ONE = [f"{s}.batch_size=1" for s in STAGES]


@pytest.fixture
def tiny_set(tiny_dir):
    return [f"tiny.dir={tiny_dir}", *ONE]


def records(output: str) -> dict[str, dict]:
    return {r["id"]: r for r in read_manifest(locate(output)).to_pylist()}


def pixels(output: str, rec: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(read_image(locate(output), rec))).convert("RGB"))


def test_one_candidate_makes_todays_images_and_every_image_gets_its_clip_score(tmp_path, tiny_set, tiny_dir):
    """k = 1: the images of a run without a scorer, and of a run whose scorer chooses among one, pixel for pixel
    (the files' provenance differs: it names the models, the scorer among them, and a chosen candidate);
    clip_score is the final image's, as the user's own CLIP scores the saved file."""
    from ifbatch.models.scorer import ClipScorer

    prompts = write_table(tmp_path / "p.parquet", {"prompt": SMALL[:3], "seed": [11, 12, 13]})
    plain, none, chooses = (str(tmp_path / n) for n in ("plain", "none", "chooses"))
    assert run_local(prompts, plain, tiny_set).ok
    assert run_local(prompts, none, [*tiny_set, "scorer.source=null"]).ok
    assert run_local(prompts, chooses, [*tiny_set, "data.min_clip_score=-100"]).ok
    a, b, c = records(plain), records(none), records(chooses)
    assert set(a) == set(b) == set(c) and len(a) == 3
    for i, r in a.items():
        assert (r["candidate"], r["candidate_seed"], r["candidate_scores"]) == (0, r["seed"], None)
        assert b[i]["clip_score"] is None  # no scorer, no score
        assert (c[i]["candidate"], c[i]["candidate_seed"], len(c[i]["candidate_scores"])) == (0, r["seed"], 1)
        np.testing.assert_array_equal(pixels(plain, r), pixels(none, b[i]))
        np.testing.assert_array_equal(pixels(plain, r), pixels(chooses, c[i]))
    scorer = ClipScorer(load_config("tiny", tiny_set).scorer, device="cpu")
    ids = sorted(a)
    again = scorer(np.stack([pixels(plain, a[i]) for i in ids]), [a[i]["prompt"] for i in ids])
    np.testing.assert_allclose([a[i]["clip_score"] for i in ids], again, atol=1e-3)


def test_best_of_four_upscales_the_candidate_clip_scores_highest_byte_identical_on_rerun_and_resume(tmp_path, tiny_set):
    """The test makes every candidate itself (the tiny cascade's T5 and stage I, the candidate seeds) and scores it
    with the same CLIP: the run's choice is the highest, its scores are these. A rerun and a resume make the same
    bytes."""
    from ifbatch.models.encode import TextEncoder
    from ifbatch.models.scorer import ClipScorer, to_pixels
    from ifbatch.models.seeding import candidate_seed
    from ifbatch.models.stage_1 import Stage1

    k = 4
    overrides = [*tiny_set, f"data.candidates_per_image={k}"]
    prompts = write_table(tmp_path / "p.parquet", {"prompt": SMALL[:4], "seed": [21, 22, 23, 24]})
    first, rerun, resumed = (str(tmp_path / n) for n in ("first", "rerun", "resumed"))
    summary = run_local(prompts, first, overrides)
    assert summary.ok and summary.counts.done == 4 and summary.counts.filtered == 0
    recs = records(first)

    cfg = load_config("tiny", overrides)
    encoder, stage_1 = TextEncoder(cfg.text_encoder, "cpu"), Stage1(cfg.stage_1, "cpu")
    scorer = ClipScorer(cfg.scorer, device="cpu")
    chosen = set()
    for r in recs.values():
        enc = encoder.encode([r["prompt"]], [r["negative_prompt"] or ""])
        seeds = [candidate_seed(r["seed"], j) for j in range(k)]
        candidates = np.concatenate([stage_1(enc.prompt_embeds, enc.negative_embeds, [s]) for s in seeds])
        scores = scorer(to_pixels(candidates), [r["prompt"]] * k)
        np.testing.assert_allclose(r["candidate_scores"], scores, atol=1e-3)
        assert r["candidate"] == int(np.argmax(scores)) and r["candidate_seed"] == seeds[r["candidate"]]
        assert r["clip_score"] is not None
        chosen.add(r["candidate"])
    assert chosen != {0}  # the choice is not simply the first candidate (which is a run without best of k)

    assert run_local(prompts, rerun, overrides).ok
    assert {i: r["sha256"] for i, r in records(rerun).items()} == {i: r["sha256"] for i, r in recs.items()}
    half = write_table(tmp_path / "half.parquet", {"prompt": SMALL[:2], "seed": [21, 22]})
    assert run_local(half, resumed, overrides).counts.done == 2  # stopped after two images: the rerun resumes
    again = run_local(prompts, resumed, overrides)
    assert (again.counts.done, again.counts.skipped) == (2, 2)
    assert {i: r["sha256"] for i, r in records(resumed).items()} == {i: r["sha256"] for i, r in recs.items()}


def test_images_under_the_score_floor_are_recorded_filtered_not_made_and_not_made_again(tmp_path, tiny_set):
    prompts = write_table(tmp_path / "p.parquet", {"prompt": SMALL[:6], "seed": list(range(31, 37))})
    kept, floored = str(tmp_path / "kept"), str(tmp_path / "floored")
    overrides = [*tiny_set, "data.candidates_per_image=2"]
    assert run_local(prompts, kept, [*overrides, "data.min_clip_score=-100"]).counts.done == 6
    best = {i: max(r["candidate_scores"]) for i, r in records(kept).items()}
    floor = float(np.median(list(best.values())))
    under = {i for i, s in best.items() if s < floor}
    assert 0 < len(under) < 6

    summary = run_local(prompts, floored, [*overrides, f"data.min_clip_score={floor}"])
    c = summary.counts
    assert (c.done, c.filtered, c.failed) == (6, len(under), 0) and summary.ok
    recs = records(floored)
    assert {i for i, r in recs.items() if r["status"] == "filtered"} == under
    for i in under:  # recorded with its scores, not made
        r = recs[i]
        assert r["image_uri"] is None and r["sha256"] is None and r["clip_score"] is None and r["error"] is None
        assert max(r["candidate_scores"]) == pytest.approx(best[i])
    for i in set(recs) - under:
        assert recs[i]["status"] == "ok" and recs[i]["sha256"] == records(kept)[i]["sha256"]
    files = {p.name for p in (tmp_path / "floored" / "images").rglob("*.png")}
    assert len(files) == 6 - len(under)
    meta = pq.read_table([str(p) for p in (tmp_path / "floored" / "images").glob("*/metadata.parquet")])  # per folder
    assert sorted(meta.column("id").to_pylist()) == sorted(set(recs) - under) and "clip_score" in meta.column_names
    import datasets  # as the README reads the scores

    ds = datasets.load_dataset(
        "imagefolder", data_dir=str(tmp_path / "floored" / "images"), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert sorted(ds["id"]) == sorted(set(recs) - under)
    assert {r["id"]: r["clip_score"] for r in ds} == pytest.approx({i: recs[i]["clip_score"] for i in ds["id"]})
    assert all(max(r["candidate_scores"]) >= floor for r in ds)

    same = run_local(prompts, floored, [*overrides, f"data.min_clip_score={floor}"])  # a rerun: nothing to make
    assert (same.counts.done, same.counts.skipped) == (0, 6)
    # a lower floor would make the filtered ones: said, with their count (tasks/outputs/drift.py), and made on request
    with pytest.raises(SettingsChanged, match=rf"data.min_clip_score .*\(this run: -100.0\) for {len(under)} image"):
        run_local(prompts, floored, [*overrides, "data.min_clip_score=-100"])
    lower = run_local(prompts, floored, [*overrides, "data.min_clip_score=-100", "data.on_changed_settings=remake"])
    assert (lower.counts.done, lower.counts.skipped, lower.counts.filtered) == (len(under), 6 - len(under), 0)
    assert all(r["status"] == "ok" for r in records(floored).values())
