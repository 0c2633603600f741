"""The run layer (the run engine on the local executor): a run, then `ifbatch verify` and `ifbatch compact` on its
output (image files in a folder, WebDataset shards on the SeaweedFS server): the run's records and files are right
and open with the standard tools (Hugging Face `datasets`, `webdataset`); a deleted image, a truncated image and an
orphan are found; --repair plus a rerun restores exactly the two broken images (the rerun skips the rest);
compaction keeps read_manifest. The files output is signed with C2PA content credentials: verify checks them and
the images remade are signed again."""

from __future__ import annotations

import json

import pytest

from ifbatch.tasks.inputs.expand import image_id
from ifbatch.tasks.outputs.credentials import signer_of
from ifbatch.tasks.outputs.formats import read_image
from ifbatch.tasks.outputs.manifest import part_paths, read_manifest
from ifbatch.tasks.outputs.shards import sample_key, shard_paths, stats_path
from ifbatch.tasks.storage import locate

from ..certs import make_chain
from ..conftest import BUCKET
from ..helpers import (
    SMALL,
    check_outputs,
    cli,
    loaded_with_datasets,
    read_bytes,
    shard_samples,
    table_ids,
    write_table,
)
from .local import run_local

pytestmark = pytest.mark.slow


def _path(uri: str) -> str:
    return uri.split("://", 1)[1] if "://" in uri else uri


@pytest.mark.parametrize("where, layout", [("local", "files"), ("s3", "webdataset")])
def test_verify_repair_rerun_and_compact(where, layout, tmp_path, tiny_dir, s3_server):
    tiny_set = [f"tiny.dir={tiny_dir}", f"output.format={layout}", "output.shard_samples=1"]
    if layout == "files":  # signed with content credentials: verify reads them, the rerun signs what it remakes
        tiny_set += make_chain(tmp_path / "certs").overrides
    prompts = write_table(tmp_path / "p.parquet", {"prompt": SMALL[:3], "n": [2, 1, 1]})  # 4 images
    out = str(tmp_path / "out") if where == "local" else f"s3://{BUCKET}/verify-{tmp_path.name}"
    first = run_local(prompts, out, tiny_set)
    assert first.ok, first
    c = first.counts
    assert (c.done, c.failed, c.rejected, c.skipped, c.images) == (4, 0, 0, 0, 4)
    ids = {image_id(r, k) for r, n in zip(table_ids(prompts), (2, 1, 1), strict=True) for k in range(n)}
    check_outputs(out, ids)
    record = json.loads(read_bytes(first.run_record))
    assert record["counts"]["done"] == 4 and record["versions"]["diffusers"] == "0.42.1"
    assert record["config"]["stage_1"]["steps"] == 4 and "AWS_SECRET_ACCESS_KEY" not in json.dumps(record)
    loc = locate(out)
    if layout == "files":  # opens with Hugging Face datasets, every image as the manifest says
        assert loaded_with_datasets(out, str(tmp_path / "hf")) == ids
    else:
        assert sorted(shard_samples(out)) == sorted(sample_key(i) for i in ids)
        stats = json.loads(loc.fs.cat_file(stats_path(shard_paths(loc)[0])))
        assert (stats["samples"], stats["ok"], stats["failed"]) == (1, 1, 0) and stats["bytes"] > 0
    res = cli("verify", out, timeout=120)
    assert res.returncode == 0 and "whole: 4 images checked" in res.stdout, res.stdout + res.stderr

    rows = sorted(read_manifest(loc).to_pylist(), key=lambda r: r["id"])
    gone, cut, kept = rows[0], rows[1], rows[2:]
    if layout == "files":
        gone_at, cut_at = _path(gone["image_uri"]), _path(cut["image_uri"])
        stray = loc.path("images", "zz", "stray.png")
        expect = [
            f"missing  {gone['id']}: {gone['image_uri']}",
            f"orphan   {loc.uri(stray)} (no record names it; it cannot be read as an image",
        ]
    else:  # one image per shard: a shard deleted, another truncated, a stray shard
        gone_at, cut_at = _path(gone["shard"]), _path(cut["shard"])
        stray = loc.path("shards", "stray.tar")
        expect = [
            f"missing  {gone['id']}: {gone['shard']}#{gone['member']} (the shard is missing)",
            f"orphan   {loc.uri(stray)} (no record names it; it holds no sample)",
        ]
    loc.fs.rm_file(gone_at)
    data = loc.fs.cat_file(cut_at)
    loc.write_bytes(cut_at, data[: len(data) // 2] if layout == "files" else data[: cut["offset"] + 100])
    loc.write_bytes(stray, b"an image no record names")

    res = cli("verify", out, timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "NOT whole: 4 images checked" in res.stdout and "1 missing, 1 corrupt, 1 orphaned" in res.stdout
    for line in expect:
        assert line in res.stdout, res.stdout
    assert f"corrupt  {cut['id']}: " in res.stdout and f"the manifest says {cut['bytes']})" in res.stdout

    res = cli("verify", out, "--repair", timeout=120)
    assert res.returncode == 1 and "recorded 2 broken images as failed" in res.stdout, res.stdout + res.stderr
    if layout == "webdataset":  # the damaged shards and the stray one are gone: readers never meet them
        assert f"removed {loc.uri(stray)}" in res.stdout and not loc.fs.exists(cut_at)
    again = run_local(prompts, out, tiny_set)
    assert again.ok and (again.counts.done, again.counts.skipped) == (2, 2), again
    after = {r["id"]: r for r in read_manifest(loc).to_pylist()}
    for r in (gone, cut):
        assert after[r["id"]]["run_id"] == again.run_id  # made again (verify below checks the new files)
    for r in kept:
        assert after[r["id"]]["run_id"] == first.run_id  # untouched
    if loc.fs.exists(stray):
        loc.fs.rm_file(stray)
    res = cli("verify", out, timeout=120)
    assert res.returncode == 0 and "whole: 4 images checked" in res.stdout, res.stdout + res.stderr
    for r in after.values():  # signed (files) or not (shards): as the C2PA library reads each image
        assert signer_of(read_image(loc, r)) == r["c2pa_signer"]
        assert (r["c2pa_signer"] or "").startswith("ifbatch test signer;") == (layout == "files")
    if layout == "files":
        assert loaded_with_datasets(out, str(tmp_path / "hf2")) == ids  # the rerun rewrote images/<ab>/metadata.parquet
    else:
        assert sorted(shard_samples(out)) == sorted(sample_key(i) for i in ids)

    before = sorted(read_manifest(loc).to_pylist(), key=lambda r: r["id"])
    assert len(part_paths(loc)) == 3  # each run's parts were merged at its end; the repair wrote one
    res = cli("compact", out, timeout=120)
    assert res.returncode == 0 and "3 manifest parts merged into 1" in res.stdout, res.stdout + res.stderr
    loc.fs.invalidate_cache()
    assert len(part_paths(loc)) == 1 and sorted(read_manifest(loc).to_pylist(), key=lambda r: r["id"]) == before


def test_outputs_on_s3_open_with_the_standard_tools(tmp_path, s3_server):
    """The other two pairs (files on S3 with `datasets`, shards in a folder with `webdataset`), written by the
    writer actors' code called directly (the runs above cover files in a folder and shards on S3)."""
    from ifbatch.tasks.outputs.loadable import write_image_metadata

    from ..unit.test_shards import write_output

    out = f"s3://{BUCKET}/load-{tmp_path.name}"
    ids = {r["id"] for r in write_output(out, 3, []).to_pylist()}
    write_image_metadata(locate(out))
    assert loaded_with_datasets(out, str(tmp_path / "hf")) == ids
    local = str(tmp_path / "shards")
    ids = {r["id"] for r in write_output(local, 3, ["output.format=webdataset", "output.shard_samples=2"]).to_pylist()}
    assert sorted(shard_samples(local)) == sorted(ids)
