"""The steps' seam: a new step -- here a filter after stage III that keeps only the darker images -- is a class and a
registration, all in this module, with no product file changed; the local executor runs it end to end: the
images it filters are recorded as filtered (done, not written), the rest are written as usual, verify finds the
output whole and a rerun resumes (nothing made twice)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ifbatch.tasks.outputs.formats import read_image
from ifbatch.tasks.outputs.manifest import read_manifest
from ifbatch.tasks.outputs.verify import verify
from ifbatch.tasks.storage import locate
from ifbatch.tasks.stream.stages import STEPS, StageActor

from ..helpers import SMALL, write_table
from .local import run_local

pytestmark = pytest.mark.slow


class KeepDark(StageActor):
    """Filters each final image whose mean brightness is over `most` (of 255): an aesthetic or content filter's
    shape. A step without a config section: one actor, no GPU, `batch_size` rows a call."""

    name = "keep_dark"
    batch_size = 3
    most = 255.0

    def __init__(self, cfg):
        self.cfg = cfg

    def compute(self, batch, idx, params):
        return {"filtered": np.array([float(batch["image"][i].mean()) > self.most for i in idx])}


def test_a_filter_after_stage_iii_is_one_class_and_one_registration(tmp_path, tiny_dir):
    tiny_set = [f"tiny.dir={tiny_dir}", "data.images_per_prompt=2", "stage_3.batch_size=2"]
    prompts = write_table(tmp_path / "p.parquet", {"prompt": SMALL[:2]})  # 4 images
    plain = run_local(prompts, str(tmp_path / "plain"), tiny_set)
    brightness = {r["id"]: r for r in read_manifest(locate(plain.output)).to_pylist()}
    assert plain.ok and len(brightness) == 4
    loc = locate(plain.output)
    means = {i: float(np.asarray(Image.open(io.BytesIO(read_image(loc, r)))).mean()) for i, r in brightness.items()}
    most = float(np.median(list(means.values())))
    dark = {i for i, m in means.items() if m <= most}
    assert 0 < len(dark) < 4, means

    KeepDark.most = most
    out = str(tmp_path / "out")
    with STEPS.registered(KeepDark, after="stage_3"):
        assert STEPS.names[-2:] == ["stage_3", "keep_dark"]
        first = run_local(prompts, out, tiny_set)
        again = run_local(prompts, out, tiny_set)
    assert "keep_dark" not in STEPS.names  # (registered for the block only)

    assert first.ok and (first.counts.done, first.counts.filtered) == (4, 4 - len(dark)), first
    records = {r["id"]: r for r in read_manifest(locate(out)).to_pylist()}
    assert {i for i, r in records.items() if r["status"] == "ok"} == dark
    assert all(records[i]["status"] == "filtered" and records[i]["image_uri"] is None for i in set(means) - dark)
    for i in dark:  # what it let through is the image a run without it makes
        assert records[i]["sha256"] == brightness[i]["sha256"]
    report, _ = verify(locate(out))
    assert report.whole and report.checked == len(dark), [p.line() for p in report.problems]
    assert (again.counts.done, again.counts.skipped) == (0, 4)  # filtered images are done: not made again
