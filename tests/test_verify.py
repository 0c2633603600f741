"""A run, then `ifbatch verify` and `ifbatch compact` on its output (a folder and the SeaweedFS server): the run's
records and files are right; a deleted image, a truncated image and an orphan are found; --repair plus a rerun
restores exactly the two broken images (the rerun skips the rest); compaction keeps read_manifest."""

from __future__ import annotations

import json

import pytest

from ifbatch.tasks.inputs.expand import image_id
from ifbatch.tasks.outputs.manifest import part_paths, read_manifest
from ifbatch.tasks.storage import locate

from .conftest import BUCKET
from .helpers import SMALL, cli, read_bytes, write_table
from .test_pipeline import _ids, check_outputs, run_flow

pytestmark = pytest.mark.slow


def _path(uri: str) -> str:
    return uri.split("://", 1)[1] if "://" in uri else uri


@pytest.mark.parametrize("where", ["local", "s3"])
def test_verify_repair_rerun_and_compact(where, tmp_path, tiny_dir, ray_cluster, prefect_api):
    tiny_set = [f"tiny.dir={tiny_dir}"]
    prompts = write_table(tmp_path / "p.parquet", {"prompt": SMALL[:3], "n": [2, 1, 1]})  # 4 images
    out = str(tmp_path / "out") if where == "local" else f"s3://{BUCKET}/verify-{tmp_path.name}"
    state, first = run_flow(prompts, out, tiny_set)
    assert state.is_completed(), state.message
    assert (first.done, first.failed, first.rejected, first.skipped, first.images) == (4, 0, 0, 0, 4)
    check_outputs(out, {image_id(r, k) for r, n in zip(_ids(prompts), (2, 1, 1), strict=True) for k in range(n)})
    record = json.loads(read_bytes(first.run_record))
    assert record["counts"]["done"] == 4 and record["versions"]["diffusers"] == "0.42.1"
    assert record["config"]["stage_1"]["steps"] == 4 and "AWS_SECRET_ACCESS_KEY" not in json.dumps(record)
    res = cli("verify", out, timeout=120)
    assert res.returncode == 0 and "whole: 4 images checked" in res.stdout, res.stdout + res.stderr

    loc = locate(out)
    rows = sorted(read_manifest(loc).to_pylist(), key=lambda r: r["id"])
    gone, cut, kept = rows[0], rows[1], rows[2:]
    loc.fs.rm_file(_path(gone["image_uri"]))
    data = loc.fs.cat_file(_path(cut["image_uri"]))
    loc.write_bytes(_path(cut["image_uri"]), data[: len(data) // 2])
    stray = loc.path("images", "zz", "stray.png")
    loc.write_bytes(stray, b"an image no record names")

    res = cli("verify", out, timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "NOT whole: 4 images checked" in res.stdout and "1 missing, 1 corrupt, 1 orphaned" in res.stdout
    assert f"missing  {gone['id']}: {gone['image_uri']}" in res.stdout
    assert f"corrupt  {cut['id']}: {cut['image_uri']} ({len(data) // 2} bytes, the manifest says {len(data)})" in (
        res.stdout
    )
    assert f"orphan   {loc.uri(stray)}" in res.stdout

    res = cli("verify", out, "--repair", timeout=120)
    assert res.returncode == 1 and "recorded 2 broken images as failed" in res.stdout, res.stdout + res.stderr
    state, again = run_flow(prompts, out, tiny_set)
    assert state.is_completed() and (again.done, again.skipped) == (2, 2), state.message
    after = {r["id"]: r for r in read_manifest(loc).to_pylist()}
    for r in (gone, cut):
        assert after[r["id"]]["run_id"] == again.run_id  # made again (verify below checks the new files)
    for r in kept:
        assert after[r["id"]]["run_id"] == first.run_id  # untouched
    loc.fs.rm_file(stray)
    res = cli("verify", out, timeout=120)
    assert res.returncode == 0 and "whole: 4 images checked" in res.stdout, res.stdout + res.stderr

    before = sorted(read_manifest(loc).to_pylist(), key=lambda r: r["id"])
    assert len(part_paths(loc)) == 3  # each run's parts were merged at its end; the repair wrote one
    res = cli("compact", out, timeout=120)
    assert res.returncode == 0 and "3 manifest parts merged into 1" in res.stdout, res.stdout + res.stderr
    loc.fs.invalidate_cache()
    assert len(part_paths(loc)) == 1 and sorted(read_manifest(loc).to_pylist(), key=lambda r: r["id"]) == before
