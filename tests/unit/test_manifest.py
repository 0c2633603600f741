"""The manifest log: the latest record per id wins, and parts an older ifbatch wrote still read."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from ifbatch.tasks.outputs import manifest
from ifbatch.tasks.outputs.manifest import RECORD_SCHEMA, SCHEMA, done_records, part_paths, read_manifest, write_part
from ifbatch.tasks.storage import locate


def records(ids, status):
    rows = [
        {"id": i, "row": n, "prompt": f"p{i}", "status": s} for n, (i, s) in enumerate(zip(ids, status, strict=True))
    ]
    return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)


def test_nothing_written_reads_as_an_empty_table_with_the_schema(tmp_path):
    t = read_manifest(locate(str(tmp_path)))
    assert t.num_rows == 0 and t.schema == SCHEMA and done_records(locate(str(tmp_path))).num_rows == 0


def test_latest_record_per_id_wins_across_parts(tmp_path):
    loc = locate(str(tmp_path))
    write_part(loc, records(["a", "b", "c"], ["ok", "failed", "ok"]), "run1", '{"m": 1}', 0)
    write_part(loc, records(["b"], ["ok"]), "run2", '{"m": 2}', 0)
    t = read_manifest(loc).to_pylist()
    assert [(r["id"], r["status"], r["run_id"]) for r in t] == [
        ("a", "ok", "run1"),
        ("c", "ok", "run1"),
        ("b", "ok", "run2"),
    ]
    assert t[2]["models"] == '{"m": 2}' and sorted(done_records(loc).column("id").to_pylist()) == ["a", "b", "c"]
    assert [p.rsplit("/", 1)[1] for p in part_paths(loc)] == ["part-run1-00000.parquet", "part-run2-00000.parquet"]


def test_a_part_written_by_an_older_ifbatch_still_reads(tmp_path):
    loc = locate(str(tmp_path))
    old = pa.table({"id": ["x"], "status": ["ok"], "seconds_encode": [0.5], "run_id": ["old"]})
    buf = io.BytesIO()
    pq.write_table(old, buf)
    loc.write_bytes(loc.path("manifest", "part-old-00000.parquet"), buf.getvalue())
    t = read_manifest(loc, ["id", "status", "seconds_text_encoder", "run_id"]).to_pylist()
    assert t == [{"id": "x", "status": "ok", "seconds_text_encoder": None, "run_id": "old"}]


def test_the_last_written_record_wins_whatever_the_parts_names(tmp_path):
    """A repair part and a rerun begun in the same second: the later write wins, not the later name."""
    loc = locate(str(tmp_path))
    later = records(["a"], ["ok"]).set_column(
        RECORD_SCHEMA.get_field_index("written_at"), "written_at", pa.array(["2026-11-29T15:54:54.900000+00:00"])
    )
    earlier = records(["a", "b"], ["failed", "ok"]).set_column(
        RECORD_SCHEMA.get_field_index("written_at"),
        "written_at",
        pa.array(["2026-11-29T15:54:54.100000+00:00", "2026-11-29T15:54:54+00:00"]),
    )
    write_part(loc, later, "20261129T155454Z-1c457c", "{}", 0)
    write_part(loc, earlier, "20261129T155454Z-verify", "{}", 0)  # sorts last by name, was written first
    t = read_manifest(loc, ["id", "status"]).to_pylist()
    assert sorted((r["id"], r["status"]) for r in t) == [("a", "ok"), ("b", "ok")]


def test_read_in_batches_gives_what_one_read_of_every_part_gives(tmp_path, monkeypatch):
    """Parts are read BATCH at a time, each batch cut down to its latest records: the latest record of an id may
    be in an earlier batch (written later), or tie on written_at with one in a later batch (the later part wins)."""
    loc = locate(str(tmp_path))
    stamps = ["2026-12-06T10:00:05", "2026-12-06T10:00:01", "2026-12-06T10:00:01", None, "2026-12-06T10:00:03"]
    for seq, (ids, stamp) in enumerate(zip([["a", "b"], ["a"], ["b", "c"], ["c"], ["a", "c"]], stamps, strict=True)):
        t = records(ids, [f"s{seq}"] * len(ids))
        t = t.set_column(RECORD_SCHEMA.get_field_index("written_at"), "written_at", pa.array([stamp] * len(ids)))
        write_part(loc, t, "run", "{}", seq)
    whole = read_manifest(loc).to_pylist()
    assert [(r["id"], r["status"]) for r in whole] == [("a", "s0"), ("b", "s0"), ("c", "s4")]
    for batch in (1, 2, 3):
        monkeypatch.setattr(manifest, "BATCH", batch)
        assert read_manifest(loc).to_pylist() == whole
        assert read_manifest(loc, ["id", "status"], ids=["c"]).to_pylist() == [{"id": "c", "status": "s4"}]


def test_an_output_whose_name_holds_glob_characters_reads(tmp_path):
    """An output path is anything a user types (the Run form): [ ] and * are not patterns to the manifest reader."""
    loc = locate(str(tmp_path / "out (v2) [a](x) *"))
    write_part(loc, records(["a", "b"], ["ok", "ok"]), "run1", "{}", 0)
    write_part(loc, records(["b"], ["failed"]), "run2", "{}", 0)
    assert [(r["id"], r["status"]) for r in read_manifest(loc, ["id", "status"]).to_pylist()] == [
        ("a", "ok"),
        ("b", "failed"),
    ]


def test_a_large_read_is_made_of_chunks_a_string_column_can_hold(tmp_path, monkeypatch):
    """A whole output's records in one chunk overflow a string column's 32-bit offsets past 2 GiB (ten million
    records did: benchmarks/end_of_run_bench.py); a read is made of CHUNK_ROWS-row chunks, with the same records."""
    loc = locate(str(tmp_path))
    ids = [f"i{n:02d}" for n in range(20)]
    write_part(loc, records(ids, ["ok"] * 20), "run1", '{"m": 1}', 0)
    write_part(loc, records(ids[5:], ["failed"] * 15), "run2", '{"m": 2}', 0)
    whole = read_manifest(loc)
    monkeypatch.setattr(manifest, "CHUNK_ROWS", 3)
    chunked = read_manifest(loc)
    assert chunked.equals(whole) and chunked.num_rows == 20
    assert chunked.column("prompt").num_chunks > 1 and max(len(c) for c in chunked.column("prompt").chunks) <= 3
    t = pa.table({"x": list(range(10))})
    assert manifest.take(t, [0, 2, 3, 7, 9]).column("x").to_pylist() == [0, 2, 3, 7, 9]  # a block at a time
