"""What a small run reads of a large output: merged manifest parts split by the hash of their ids; resume reads only
the parts its images' records can be in, the end of a run rewrites only the images/<ab>/metadata.parquet of the
folders its images are in. Shown by making every other part unreadable: the reads still succeed, and give what a
read of the whole output gives. (The cost against output size: benchmarks/end_of_run_bench.py.)"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ifbatch.configs import load_config
from ifbatch.tasks.outputs import manifest
from ifbatch.tasks.outputs.compact import compact, split_digits
from ifbatch.tasks.outputs.loadable import folder_of, metadata_paths, write_image_metadata
from ifbatch.tasks.outputs.manifest import bucket_of, id_hash, part_paths, read_manifest, write_part
from ifbatch.tasks.outputs.writer import ImageWriter
from ifbatch.tasks.storage import locate
from tests.helpers import loaded_with_datasets, writer_rows

from .test_manifest import records

SLOW = pytest.mark.slow  # each opens the output with datasets (1-2 s): in the full suite, not the fast layer


def spoiled(paths: list[str]) -> dict[str, bytes]:
    """Make `paths` unreadable as Parquet; returns their bytes, to put back."""
    kept = {}
    for p in paths:
        with open(p, "rb") as f:
            kept[p] = f.read()
        with open(p, "wb") as f:
            f.write(b"not parquet")
    return kept


def restore(kept: dict[str, bytes]) -> None:
    for p, data in kept.items():
        with open(p, "wb") as f:
            f.write(data)


def test_split_digits_keep_parts_near_their_size():
    assert [split_digits(n, 4096) for n in (36, 4096, 4097, 65_536, 65_537, 1_000_000, 10**7, 10**10)] == [
        0, 0, 1, 1, 2, 2, 3, 4,
    ]  # fmt: skip


def test_the_parts_an_id_or_a_folder_can_be_in_are_those_whose_prefixes_agree():
    paths = [f"part-a-c20261201T000000000000Z-h{p:02x}.parquet" for p in range(256)] + ["part-b-00000.parquet"]
    paths += [f"part-c-c20261201T000000000000Z-h{p:03x}.parquet" for p in range(4096)]
    for wanted in ({id_hash(f"i{k}") for k in range(5)}, {"ab"}, {"0", "fff"}):
        agree = [
            p for p in paths if (b := bucket_of(p)) is None or any(b.startswith(w) or w.startswith(b) for w in wanted)
        ]
        assert manifest.parts_of(paths, wanted) == agree


def test_a_merge_is_split_by_id_hash_and_a_few_ids_read_only_their_parts(tmp_path):
    loc = locate(str(tmp_path))
    ids = [f"img-{i:04d}" for i in range(300)]
    write_part(loc, records(ids[:200], ["ok"] * 200), "20261201T000000Z-aaaaaa", '{"m": 1}', 0)
    write_part(loc, records(ids[100:], ["failed"] * 200), "20261201T000000Z-aaaaaa", '{"m": 1}', 1)
    before = read_manifest(loc)
    written, removed = compact(loc, part_rows=20)  # 300 records: 16 parts by one hex digit
    assert len(removed) == 2 and len(written) == 16 == len(part_paths(loc))
    for p in written:
        got = pq.read_table(p).column("id").to_pylist()
        assert got and all(id_hash(i).startswith(bucket_of(p)) for i in got), p
    assert read_manifest(loc).sort_by("id").equals(before.sort_by("id"))
    write_part(loc, records(["img-0001"], ["failed"]), "20261202T000000Z-bbbbbb", '{"m": 2}', 0)  # a later run
    mine = ["img-0001", "img-0150", "img-0299", "new-one"]
    theirs = [p for p in written if not any(id_hash(i).startswith(bucket_of(p)) for i in mine)]
    assert len(theirs) >= 12
    kept = spoiled(theirs)
    got = {r["id"]: (r["status"], r["run_id"]) for r in read_manifest(loc, ["id", "status", "run_id"], ids=mine)
           .to_pylist()}  # fmt: skip
    assert got == {
        "img-0001": ("failed", "20261202T000000Z-bbbbbb"),  # the later run's record still wins
        "img-0150": ("failed", "20261201T000000Z-aaaaaa"),
        "img-0299": ("failed", "20261201T000000Z-aaaaaa"),
    }
    with pytest.raises(pa.ArrowInvalid):
        read_manifest(loc)  # the spoiled parts are read by a whole read: the one above did not read them
    restore(kept)
    compact(loc, part_rows=20)  # again: the later run's record merged into its part
    assert len(part_paths(loc)) == 16 and read_manifest(loc, ["status"], ids=["img-0001"]).to_pylist() == [
        {"status": "failed"}
    ]


def files_output(out: str, ids: list[str], run_id: str, failed: int = 0, depth: int = 2) -> pa.Table:
    """Images of `ids` (the last `failed` failed) written as a run writes them, and their manifest part."""
    cfg = load_config("tiny", [f"output.shard_depth={depth}"])
    pixels = np.random.default_rng(len(ids)).integers(0, 256, (len(ids), 16, 16, 3), dtype=np.uint8)
    rows = writer_rows(pixels, failed=failed)
    rows["id"] = rows["prompt_id"] = np.array(ids, object)
    made = ImageWriter(cfg, out)(rows)
    write_part(locate(out), made, run_id, "{}", 0)
    return made


@SLOW
def test_a_small_runs_end_rewrites_only_the_tables_of_its_folders(tmp_path):
    out = str(tmp_path / "out")
    loc = locate(out)
    files_output(out, [f"e{i}" for i in range(120)], "20261201T000000Z-early")
    files_output(out, [f"e{i}" for i in range(120, 160)], "20261201T010000Z-early2")
    written, _ = compact(loc, part_rows=8)  # 160 records: split 256 ways by two hex digits
    assert all(len(bucket_of(p)) == 2 for p in written)
    assert len(write_image_metadata(loc)) == len({folder_of(f"e{i}") for i in range(160)})
    tables = metadata_paths(loc)
    times = {f: os.stat(p).st_mtime_ns for f, p in tables.items()}
    # a small run: two new images, and one made before that failed now (it leaves its folder's table)
    small = files_output(out, ["n0", "n1", "e3"], "20261202T000000Z-small", failed=1)
    ids = small.column("id").to_pylist()
    folders = {folder_of(i) for i in ids}
    theirs = [p for p in part_paths(loc) if bucket_of(p) and bucket_of(p) not in folders]
    kept = spoiled(theirs)
    wrote = write_image_metadata(loc, ids)
    restore(kept)
    assert sorted(wrote) == sorted(loc.uri(p) for f, p in metadata_paths(loc).items() if f in folders)
    for f, p in metadata_paths(loc).items():  # every other folder's table untouched
        assert f in folders or os.stat(p).st_mtime_ns == times[f]
    want = {r["id"]: r["sha256"] for r in read_manifest(loc).to_pylist() if r["status"] == "ok"}
    assert set(want) == {f"e{i}" for i in range(160) if i != 3} | {"n0", "n1"}
    assert loaded_with_datasets(out, str(tmp_path / "hf")) == set(want)  # once each, with its sha256: every folder


@SLOW
def test_one_table_of_an_earlier_ifbatch_is_replaced_by_the_folders_tables_once(tmp_path):
    out = str(tmp_path / "out")
    loc = locate(out)
    files_output(out, [f"o{i}" for i in range(30)], "20261201T000000Z-old")
    whole = read_manifest(loc)
    names = [u.rsplit("/images/", 1)[1] for u in whole.column("image_uri").to_pylist()]
    old = pa.table({"file_name": names, "id": whole.column("id"), "sha256": whole.column("sha256")})
    pq.write_table(old, os.path.join(out, "images", "metadata.parquet"))  # what ifbatch wrote before
    files_output(out, ["new"], "20261202T000000Z-new")
    wrote = write_image_metadata(loc, ["new"])  # a table in images/ itself: every folder rewritten
    assert "" not in metadata_paths(loc) and len(wrote) == len(
        {folder_of(i) for i in [*whole["id"].to_pylist(), "new"]}
    )
    assert loaded_with_datasets(out, str(tmp_path / "hf")) == {f"o{i}" for i in range(30)} | {"new"}


@SLOW
def test_images_directly_in_images_have_one_table_rewritten_whole(tmp_path):
    out = str(tmp_path / "out")
    loc = locate(out)
    files_output(out, [f"d{i}" for i in range(12)], "20261201T000000Z-flat", depth=0)
    write_image_metadata(loc)
    files_output(out, ["d12", "d13"], "20261202T000000Z-flat", depth=0)
    assert write_image_metadata(loc, ["d12", "d13"]) == [loc.uri(loc.path("images", "metadata.parquet"))]
    assert list(metadata_paths(loc)) == [""]
    assert loaded_with_datasets(out, str(tmp_path / "hf")) == {f"d{i}" for i in range(14)}


@SLOW
def test_a_table_with_another_versions_columns_has_every_table_rewritten(tmp_path):
    out = str(tmp_path / "out")
    loc = locate(out)
    files_output(out, [f"v{i}" for i in range(40)], "20261201T000000Z-v1")
    write_image_metadata(loc)
    files_output(out, ["w0"], "20261202T000000Z-v2")
    older = next(p for f, p in metadata_paths(loc).items() if f != folder_of("w0"))
    pq.write_table(pq.read_table(older).drop_columns(["c2pa_signer"]), older)  # as an ifbatch before it wrote it
    assert len(write_image_metadata(loc, ["w0"])) == len(metadata_paths(loc)) > 1  # every table, one set of columns
    assert "c2pa_signer" in pq.read_schema(older).names
    assert loaded_with_datasets(out, str(tmp_path / "hf")) == {f"v{i}" for i in range(40)} | {"w0"}
