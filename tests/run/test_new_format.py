"""The formats' seam: a new output format -- Parquet files under rows/ whose rows hold the encoded images -- is a
class and a registration, all in this module, with no product file changed; the local executor runs it end to
end: its writer writes the files, each record names the format and where its image is, the images read back are
the ones a files run makes, verify checks every image and finds a damaged one, and a rerun resumes (nothing made
twice)."""

from __future__ import annotations

import io
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ifbatch.tasks.outputs.formats import FORMATS, Format, compare, format_of, read_image
from ifbatch.tasks.outputs.manifest import RECORD_SCHEMA, read_manifest
from ifbatch.tasks.outputs.unrecorded import Unit
from ifbatch.tasks.outputs.verify import verify
from ifbatch.tasks.outputs.writer import WriterStep
from ifbatch.tasks.storage import locate

from ..helpers import SMALL, write_table
from .local import run_local

pytestmark = pytest.mark.slow

ROWS = "rows"


class RowsWriter:
    """After the encoders: a batch's ok images written as one Parquet file (id, image bytes, provenance), their
    records pointing into it (`shard`: the file, `member`: the id, `offset`: the row)."""

    def __init__(self, cfg, output: str, run_id: str):
        self.loc, self.run_id = locate(output, cfg.s3), run_id

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = [i for i, s in enumerate(batch.column("status").to_pylist()) if s == "ok"]
        shard, member, offset = [None] * batch.num_rows, [None] * batch.num_rows, [None] * batch.num_rows
        if ok:
            rows = batch.take(ok)
            buf = io.BytesIO()
            table = pa.table({"id": rows.column("id"), "image": rows.column("payload"), "meta": rows.column("meta")})
            pq.write_table(table, buf)
            path = self.loc.path(ROWS, f"{self.run_id}-{uuid.uuid4().hex[:8]}.parquet")
            self.loc.write_bytes(path, buf.getvalue())
            for k, i in enumerate(ok):
                shard[i], member[i], offset[i] = self.loc.uri(path), batch.column("id")[i].as_py(), k
        done = {
            "shard": pa.array(shard, pa.string()),
            "member": pa.array(member),
            "offset": pa.array(offset, pa.int64()),
        }
        return pa.Table.from_arrays(
            [done[c] if c in done else batch.column(c) for c in RECORD_SCHEMA.names], schema=RECORD_SCHEMA
        )


class ParquetRows(Format):
    name = "parquet_rows"
    folder = ROWS

    def writers(self, cfg, output, run_id, models, ledger=None):
        return [
            self.encoder(cfg, output, run_id, models, None, to_files=False),
            WriterStep(RowsWriter, dict(cfg=cfg, output=output, run_id=run_id), 4, "pyarrow", 0.25, 0.25),
        ]

    def _path(self, loc, uri: str) -> str:
        return loc.path(ROWS, uri.rsplit("/", 1)[-1])

    def read(self, loc, rec):
        table = pq.read_table(io.BytesIO(loc.fs.cat_file(self._path(loc, rec["shard"]))), columns=["image"])
        return table.column("image")[rec["offset"]].as_py()

    def checks(self, loc, recs):
        by_file: dict[str, list[dict]] = {}
        for r in recs:
            by_file.setdefault(self._path(loc, r["shard"]), []).append(r)
        return [(len(rs), lambda p=p, rs=rs: self._check(loc, p, rs)) for p, rs in by_file.items()]

    def _check(self, loc, path, recs):
        images = pq.read_table(io.BytesIO(loc.fs.cat_file(path)), columns=["image"]).column("image")
        found = [compare(images[r["offset"]].as_py(), r, f"{loc.uri(path)}#{r['offset']}") for r in recs]
        return [p for p in found if p is not None]

    def unrecorded(self, loc, manifest):
        named = {self._path(loc, u) for u in manifest.column("shard").to_pylist() if u}
        base = loc.path(ROWS)
        files = loc.fs.find(base) if loc.fs.exists(base) else []
        return [Unit(loc.uri(p), None, "no record names it") for p in sorted(set(files) - named)]

    def read_unit(self, loc, path):
        return Unit(loc.uri(path), None, "images in Parquet rows are not taken over")


def test_parquet_rows_holding_the_images_are_one_class_and_one_registration(tmp_path, tiny_dir):
    tiny_set = [f"tiny.dir={tiny_dir}", "data.images_per_prompt=2"]
    prompts = write_table(tmp_path / "p.parquet", {"prompt": SMALL[:3]})  # 6 images
    files = run_local(prompts, str(tmp_path / "files"), tiny_set)
    assert files.ok
    as_files = {r["id"]: r for r in read_manifest(locate(files.output)).to_pylist()}

    out = str(tmp_path / "rows")
    loc = locate(out)
    with FORMATS.registered(ParquetRows()):
        first = run_local(prompts, out, [*tiny_set, "output.format=parquet_rows"])
        records = {r["id"]: r for r in read_manifest(loc).to_pylist()}
        report, _ = verify(loc)
        images = {i: read_image(loc, r) for i, r in records.items()}
        again = run_local(prompts, out, [*tiny_set, "output.format=parquet_rows"])
        damaged = records[sorted(records)[0]]  # one image's bytes changed inside its file
        path = ParquetRows()._path(loc, damaged["shard"])
        table = pq.read_table(path)
        column = table.column("image").to_pylist()
        column[damaged["offset"]] = column[damaged["offset"]][:-1] + b"\x00"
        pq.write_table(table.set_column(1, "image", pa.array(column, pa.binary())), path)
        after, _ = verify(loc)
    assert "parquet_rows" not in FORMATS  # (registered for the block only)

    assert first.ok and first.counts.done == 6, first
    assert {r["format"] for r in records.values()} == {"parquet_rows"} and all(r["shard"] for r in records.values())
    assert sorted(p.rsplit("/", 1)[-1] for p in loc.fs.ls(loc.path(ROWS))) and not loc.fs.exists(loc.path("images"))
    for i, data in images.items():  # the images are the ones a files run makes, byte for byte
        assert data == open(as_files[i]["image_uri"], "rb").read() and records[i]["sha256"] == as_files[i]["sha256"]
    assert report.whole and report.checked == 6, [p.line() for p in report.problems]
    assert (again.counts.done, again.counts.skipped) == (0, 6)  # resumed: nothing made twice
    assert [(p.kind, p.id) for p in after.problems] == [("corrupt", damaged["id"])]
    assert format_of({"format": None, "shard": None}).name == "files"  # records from before records named it
