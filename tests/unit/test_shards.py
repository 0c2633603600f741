"""WebDataset shards without Ray: the writer actors' code called directly on a folder. Shards are cut by samples and
bytes, open with the webdataset library, carry their stats; verify finds a deleted, a truncated and a stray shard
and a sample no record names; repair removes the damaged shards and records all of their images as failed; a rerun's
start removes the shards no record names. A files output opens with `load_dataset("imagefolder")`."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pyarrow as pa
import pytest

from ifbatch.configs import load_config
from ifbatch.tasks.outputs.formats import read_image
from ifbatch.tasks.outputs.loadable import write_image_metadata
from ifbatch.tasks.outputs.manifest import read_manifest, write_part
from ifbatch.tasks.outputs.shards import (
    Sample,
    build_shard,
    members,
    remove_orphan_shards,
    sample_key,
    shard_paths,
    stats_path,
)
from ifbatch.tasks.outputs.verify import repair, verify
from ifbatch.tasks.outputs.writer import ImageWriter, ShardWriter
from ifbatch.tasks.storage import locate
from tests.helpers import writer_rows


def write_output(out: str, n: int, overrides: list[str], failed: int = 0, run_id: str = "run1") -> pa.Table:
    """n images (the last `failed` failed upstream) through the writers and into the manifest, as a run would."""
    cfg = load_config("tiny", overrides)
    pixels = np.random.default_rng(3).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    records = ImageWriter(cfg, out)(writer_rows(pixels, failed=failed))
    if cfg.output.format == "webdataset":
        step = cfg.output.shard_samples
        shards = ShardWriter(cfg, out, run_id)
        records = pa.concat_tables([shards(records.slice(i, step)) for i in range(0, records.num_rows, step)])
    write_part(locate(out), records, run_id, "{}", 0)
    return records


def test_sample_keys_escape_dots_and_members_carry_offsets():
    assert sample_key("a.b.c~2") == "a%2Eb%2Ec~2"  # readers split key and extension at the first dot
    data, found = build_shard([Sample("k1", "png", b"x" * 700, "{}", "p1"), Sample("k2", "png", b"yz", "{}", "p2")])
    assert [m.name for m in found] == ["k1.png", "k2.png"]
    assert data[found[0].offset : found[0].offset + 700] == b"x" * 700 and data[found[1].offset :][:2] == b"yz"
    names = [name for name, _, _ in members(data)]
    assert names == ["k1.json", "k1.png", "k1.txt", "k2.json", "k2.png", "k2.txt"]
    assert [name for name, _, _ in members(data[:1024])] == []  # a shard cut inside its first header: nothing


def test_shards_are_cut_by_samples_and_bytes_and_open_with_webdataset(tmp_path):
    import webdataset as wds

    out = str(tmp_path / "out")
    records = write_output(out, 7, ["output.format=webdataset", "output.shard_samples=4"], failed=1)
    loc = locate(out)
    paths = shard_paths(loc)
    assert len(paths) == 2  # 6 ok images, 4 a call; the failed row is recorded, in no shard
    stats = [json.loads(loc.fs.cat_file(stats_path(p))) for p in paths]
    assert [(s["samples"], s["ok"], s["failed"]) for s in stats] == [(4, 4, 0), (2, 2, 1)]
    rows = {r["id"]: r for r in records.to_pylist()}
    assert rows["r6"]["status"] == "failed" and rows["r6"]["shard"] is None
    seen = []
    for sample in wds.WebDataset(paths, shardshuffle=False):
        rec = rows[sample["__key__"]]
        assert hashlib.sha256(sample["png"]).hexdigest() == rec["sha256"] and len(sample["png"]) == rec["bytes"]
        assert json.loads(sample["json"])["seed"] == rec["seed"] and sample["txt"] == b"p"
        assert read_image(loc, rec) == sample["png"]  # one range read, at the recorded offset
        seen.append(sample["__key__"])
    assert seen == [f"r{i}" for i in range(6)]

    small = ["output.format=webdataset", "output.shard_samples=100", "output.shard_bytes=1048576"]
    write_output(str(tmp_path / "small"), 3, small)
    assert len(shard_paths(locate(str(tmp_path / "small")))) == 1  # three 16 px images fit in 1 MB
    writer = ShardWriter(load_config("tiny", small), str(tmp_path / "small"), "r")
    assert writer.groups([0, 1, 2], [600_000, 600_000, 10]) == [[0], [1, 2]]  # cut before passing 1 MB


def test_verify_and_repair_shards(tmp_path):
    out = str(tmp_path / "out")
    write_output(out, 4, ["output.format=webdataset", "output.shard_samples=1"])
    loc = locate(out)
    report, ok = verify(loc)
    assert report.whole and report.checked == 4
    rows = sorted(read_manifest(loc).to_pylist(), key=lambda r: r["id"])
    gone, cut = rows[0], rows[1]
    loc.fs.rm_file(loc.path("shards", gone["shard"].rsplit("/", 1)[1]))
    data = loc.fs.cat_file(cut["shard"])
    loc.write_bytes(cut["shard"], data[: cut["offset"] + 10])
    stray = loc.path("shards", "stray.tar")
    loc.write_bytes(stray, b"junk")
    report, ok = verify(loc)
    kinds = sorted((p.kind, p.id) for p in report.problems)
    assert kinds == [("corrupt", cut["id"]), ("missing", gone["id"]), ("orphan", None)], report.problems
    fixed = repair(loc, report, ok)
    assert fixed.failed == 2 and sorted(fixed.removed) == sorted([cut["shard"], loc.uri(stray)])
    after = {r["id"]: r for r in read_manifest(loc).to_pylist()}
    assert after[gone["id"]]["status"] == after[cut["id"]]["status"] == "failed"
    assert after[rows[2]["id"]]["status"] == "ok" and len(shard_paths(loc)) == 2
    assert verify(loc)[0].whole  # what is left is whole; the failed images are the next run's work


def test_a_sample_no_record_names_is_an_orphan(tmp_path):
    out = str(tmp_path / "out")
    write_output(out, 2, ["output.format=webdataset", "output.shard_samples=2"])
    loc = locate(out)
    (path,) = shard_paths(loc)
    data, _ = build_shard([Sample("r0", "png", b"a", "{}", "p"), Sample("r1", "png", b"b", "{}", "p")])
    data, _ = build_shard(
        [Sample(n.split(".")[0], "png", b"", "{}", "") for n, _, _ in members(data) if n.endswith(".png")]
        + [Sample("extra", "png", b"zz", "{}", "")]
    )
    loc.write_bytes(path, data)
    kinds = sorted((p.kind, p.uri.rsplit("#", 1)[-1]) for p in verify(loc)[0].problems)
    assert ("orphan", "extra.json") in kinds and ("orphan", "extra.png") in kinds
    assert sum(k == "corrupt" for k, _ in kinds) == 2  # the recorded members now hold other bytes


def test_a_rerun_removes_the_shards_no_record_names(tmp_path):
    out = str(tmp_path / "out")
    write_output(out, 2, ["output.format=webdataset", "output.shard_samples=1"])
    loc = locate(out)
    cfg = load_config("tiny", ["output.format=webdataset"])
    unrecorded = ImageWriter(cfg, out)(writer_rows(np.zeros((1, 16, 16, 3), np.uint8)))  # a killed run's shard
    ShardWriter(cfg, out, "killed")(unrecorded)
    assert len(shard_paths(loc)) == 3
    removed = remove_orphan_shards(loc)
    assert len(removed) == 1 and "killed" in removed[0] and len(shard_paths(loc)) == 2
    assert not loc.fs.exists(stats_path(loc.path("shards", removed[0].rsplit("/", 1)[1])))
    assert remove_orphan_shards(loc) == []


@pytest.mark.parametrize("failed", [0, 1])
def test_a_files_output_opens_with_datasets_imagefolder(failed, tmp_path):
    import datasets

    out = str(tmp_path / "out")
    records = {r["id"]: r for r in write_output(out, 3, [], failed=failed).to_pylist()}
    loc = locate(out)
    written = write_image_metadata(loc)  # a table per first-level folder of the ok images
    assert written and all(re.search(r"/images/[0-9a-f]{2}/metadata\.parquet$", w) for w in written), written
    ds = datasets.load_dataset("imagefolder", data_dir=f"{out}/images", split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 3 - failed
    for row in ds.cast_column("image", datasets.Image(decode=False)):
        with open(row["image"]["path"], "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == records[row["id"]]["sha256"]
        assert (row["seed"], row["prompt"], row["stage_1_steps"]) == (records[row["id"]]["seed"], "p", 4)
    report, _ = verify(loc)
    assert report.whole  # the metadata table is the output's own, not an orphan


def test_an_output_whose_format_changed_between_runs_is_checked_image_by_image_by_its_format(tmp_path):
    """Three images as files, then (the format changed) three more as shards into the same output: each record is
    read, checked and counted by the format that holds it; a deleted file and a deleted shard are each found."""
    from ifbatch.tasks.outputs.formats import FORMATS, format_of

    out = str(tmp_path / "out")
    loc = locate(out)
    pixels = np.random.default_rng(5).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    for k, (fmt, run) in enumerate([("files", "run1"), ("webdataset", "run2")]):
        cfg = load_config("tiny", [f"output.format={fmt}", "output.shard_samples=3"])
        rows = writer_rows(pixels)
        rows["id"] = np.array([f"{fmt}-{i}" for i in range(3)], object)
        records = ImageWriter(cfg, out)(rows)
        if fmt == "webdataset":
            records = ShardWriter(cfg, out, run)(records)
        write_part(loc, records, run, "{}", k)
    manifest = read_manifest(loc).to_pylist()
    assert sorted(format_of(r).name for r in manifest) == ["files"] * 3 + ["webdataset"] * 3
    assert all(hashlib.sha256(read_image(loc, r)).hexdigest() == r["sha256"] for r in manifest)
    report, _ = verify(loc)
    assert report.whole and report.checked == 6, [p.line() for p in report.problems]
    by_id = {r["id"]: r for r in manifest}
    loc.fs.rm_file(by_id["files-1"]["image_uri"])
    loc.fs.rm_file(by_id["webdataset-0"]["shard"])
    report, _ = verify(loc)
    assert sorted(p.id for p in report.problems if p.kind == "missing") == [
        "files-1", "webdataset-0", "webdataset-1", "webdataset-2",
    ]  # fmt: skip
    assert set(FORMATS) == {"files", "webdataset"}
