"""Manifest compaction: the same read_manifest result after it, and after a crash in the middle of it."""

from __future__ import annotations

import pytest

from ifbatch.tasks.outputs.compact import compact, merge, run_of
from ifbatch.tasks.outputs.manifest import part_paths, read_manifest, write_part
from ifbatch.tasks.storage import locate

from .test_manifest import records


def three_runs(tmp_path):
    loc = locate(str(tmp_path))
    write_part(loc, records(["a", "b"], ["ok", "failed"]), "20261129T100000Z-aaaaaa", '{"m": 1}', 0)
    write_part(loc, records(["c"], ["ok"]), "20261129T100000Z-aaaaaa", '{"m": 1}', 1)
    write_part(loc, records(["b", "d"], ["ok", "failed"]), "20261129T110000Z-bbbbbb", '{"m": 2}', 0)
    write_part(loc, records(["d"], ["ok"]), "20261129T110000Z-bbbbbb", '{"m": 2}', 1)
    return loc


def manifest(loc):
    return sorted(read_manifest(loc).to_pylist(), key=lambda r: r["id"])


def test_compaction_keeps_the_manifest_and_later_runs_still_win(tmp_path):
    loc = three_runs(tmp_path)
    before = manifest(loc)
    written, removed = compact(loc, "20261129T100000Z-aaaaaa")  # one run's parts: merged in place
    assert len(written) == 1 and len(removed) == 2 and manifest(loc) == before
    assert [run_of(p) for p in part_paths(loc)] == ["20261129T100000Z-aaaaaa"] + ["20261129T110000Z-bbbbbb"] * 2
    written, removed = compact(loc)  # the whole output
    assert len(part_paths(loc)) == 1 and len(removed) == 3 and manifest(loc) == before
    assert {r["id"]: r["status"] for r in before} == {"a": "ok", "b": "ok", "c": "ok", "d": "ok"}
    assert {r["id"]: r["models"] for r in before}["b"] == '{"m": 2}'  # each record keeps its run's facts
    write_part(loc, records(["a"], ["failed"]), "20261129T120000Z-cccccc", '{"m": 3}', 0)
    assert {r["id"]: r["status"] for r in manifest(loc)}["a"] == "failed"  # a run after compaction is later
    assert compact(loc, "20261129T999999Z-none") == ([], [])  # nothing to merge


def test_a_crash_between_writing_and_removing_loses_and_duplicates_nothing(tmp_path):
    loc = three_runs(tmp_path)
    before = manifest(loc)
    merge(loc, part_paths(loc))  # what a crash right after the merged part is written leaves
    assert len(part_paths(loc)) == 5 and manifest(loc) == before
    compact(loc)  # the next compaction finishes the job
    assert len(part_paths(loc)) == 1 and manifest(loc) == before


def test_a_stray_file_in_the_manifest_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match="'notes.parquet' is not a manifest part name"):
        run_of("notes.parquet")
