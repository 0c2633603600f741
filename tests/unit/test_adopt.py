"""Whole images without records (a run killed between writing an image and recording it): each carries its whole
record, so `verify` lists it as adoptable and `--repair` records it as the writer would have, without touching it.
The writers' code is called directly on a folder; a killed run and its rerun: tests/run/test_run.py."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from ifbatch.configs import load_config
from ifbatch.tasks.outputs.manifest import RECORD_SCHEMA, read_manifest, write_part
from ifbatch.tasks.outputs.verify import repair, verify
from ifbatch.tasks.outputs.writer import ImageWriter, ShardWriter
from ifbatch.tasks.storage import locate
from tests.helpers import writer_rows

MEASURED = {"written_at", "seconds_write", "placement", *(n for n in RECORD_SCHEMA.names if n.startswith("seconds_"))}


def written(out: str, layout: str, n: int, run_id: str) -> pa.Table:
    """n images written as a run's writers write them; their records returned, not written to the manifest."""
    cfg = load_config("tiny", [f"output.format={layout}", "output.shard_samples=2"])
    pixels = np.random.default_rng(5).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    batch = writer_rows(pixels)
    batch["id"] = np.array([f"{run_id}-r{i}" for i in range(n)], object)
    records = ImageWriter(cfg, out, {"stage_1": {"commit": "abc"}}, run_id=run_id)(batch)
    if layout == "webdataset":
        shards = ShardWriter(cfg, out, run_id)
        records = pa.concat_tables([shards(records.slice(i, 2)) for i in range(0, n, 2)])
    return records


def mtimes(out) -> dict[str, int]:
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(out) for f in fs}


@pytest.mark.parametrize("layout", ["files", "webdataset"])
def test_verify_lists_whole_unrecorded_images_as_adoptable_and_repair_records_them_as_the_writer_would(
    tmp_path, layout
):
    out = str(tmp_path / "out")
    loc = locate(out)
    kept = written(out, layout, 2, "early")
    write_part(loc, kept, "early", '{"stage_1": {"commit": "abc"}}', 0)  # recorded
    lost = written(out, layout, 4, "killed")  # written, never recorded
    stray = tmp_path / "out" / ("images/stray.png" if layout == "files" else "shards/stray.tar")
    stray.write_bytes(b"not an image, nor a tar")

    report, ok = verify(loc)
    units = 4 if layout == "files" else 2  # a shard holds 2
    assert report.count("adoptable") == units and report.count("orphan") == 1 and not report.whole
    assert {p.uri for p in report.problems if p.kind == "orphan"} == {str(stray)}
    before = mtimes(out)
    fixed = repair(loc, report, ok)
    assert fixed.adopted == 4 and fixed.failed == 0
    after = mtimes(out)
    same = {p: t for p, t in after.items() if p in before and p != str(stray)}
    assert same == {p: t for p, t in before.items() if p != str(stray)}  # not one image touched
    assert os.path.exists(stray) == (layout == "files")  # an orphaned shard is removed, a file listed only

    got = {r["id"]: r for r in read_manifest(loc).to_pylist()}
    assert sorted(got) == sorted(kept.column("id").to_pylist() + lost.column("id").to_pylist())
    for want in lost.to_pylist():
        have = got[want["id"]]
        assert {k: v for k, v in have.items() if k in RECORD_SCHEMA.names and k not in MEASURED} == {
            k: v for k, v in want.items() if k not in MEASURED
        }
        assert have["run_id"].endswith("-verify") and have["models"] == '{"stage_1": {"commit": "abc"}}'
    report, _ = verify(loc)
    assert report.count("adoptable") == 0 and report.checked == 6


def test_a_shard_samples_json_carries_the_images_scores_and_flags_so_a_loader_needs_no_join(tmp_path):
    """Each WebDataset sample's .json has the per-image columns of images/metadata.parquet that say what an image
    is (its safety flags, its CLIP score, best of k's choice), not only how it was made."""
    import json

    from ifbatch.tasks.outputs.shards import members, shard_paths

    out = str(tmp_path / "out")
    records = {r["id"]: r for r in written(out, "webdataset", 4, "run").to_pylist()}
    loc = locate(out)
    for path in shard_paths(loc):
        data = loc.fs.cat_file(path)
        for name, offset, size in members(data):
            if name.endswith(".json"):
                meta = json.loads(data[offset : offset + size])
                r = records[meta["id"]]
                for key in ("nsfw", "watermark_detected", "watermarked", "clip_score", "row", "truncated"):
                    assert meta[key] == r[key], key
