"""What lets the standard tools open an output in one line: a metadata.parquet in each folder under images/ (one
per first-level hashed folder, images/<ab>/metadata.parquet), the tables Hugging Face
`load_dataset("imagefolder", data_dir=".../images")` joins to the image files (their `file_name` column, relative
to the table's folder), with each image's prompt, seed and parameters beside it. WebDataset shards need nothing
more (`webdataset.WebDataset(<the shards>)`).

A run rewrites the tables of the folders its own images are in, from the manifest's records of those folders only
(the manifest parts split by id hash: manifest.py), so the end of a small run costs the same in a large output;
`verify --repair` rewrites them all. Each names exactly the images the manifest says are ok (a run killed before its
end leaves the previous ones; the next run rewrites them). An output with `output.shard_depth=0` (every image
directly in images/) has one table, images/metadata.parquet, rewritten whole; so has an output an ifbatch before
per-folder tables wrote, once.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..storage import Location
from .images import IMAGES_DIR
from .manifest import id_hash, read_manifest, take

METADATA = "metadata.parquet"  # in each folder of images/ that holds images
DROPPED = ("status", "error", "format", "image_uri", "shard", "member", "offset", "placement")  # not facts of the image
TOP = ""  # the folder key of images/ itself


def folder_of(row_id: str) -> str:
    """The first-level folder under images/ of an image file (output.shard_depth >= 1)."""
    return id_hash(row_id)[:2]


def table_path(loc: Location, folder: str) -> str:
    return loc.path(IMAGES_DIR, folder, METADATA) if folder else loc.path(IMAGES_DIR, METADATA)


def metadata_paths(loc: Location) -> dict[str, str]:
    """The output's metadata tables, by folder (TOP: images/metadata.parquet): one LIST of images/, then a HEAD a
    folder (not a listing of every folder's sub-folders)."""
    folders = _folders(loc)
    if folders is None:
        return {}
    return {f: table_path(loc, f) for f in [TOP, *folders] if loc.fs.exists(table_path(loc, f))}


def _folders(loc: Location) -> list[str] | None:
    """The first-level folders under images/ (one LIST; None when there is no images/)."""
    base = loc.path(IMAGES_DIR)
    loc.fs.invalidate_cache(base)
    if not loc.fs.exists(base):
        return None
    return sorted(n for n in (p.rstrip("/").rsplit("/", 1)[-1] for p in loc.fs.ls(base, detail=False)) if len(n) == 2)


def write_image_metadata(loc: Location, ids: Iterable[str] | None = None) -> list[str]:
    """Write the metadata tables of the folders that hold `ids` (the images a run recorded, whatever their status;
    None: every folder), each for the manifest's ok image files in it; a folder left without one loses its table.
    Returns the URIs written. Every folder is rewritten instead when images/ has a table of its own (an output
    with images directly in images/, or from an ifbatch before per-folder tables) or another folder's table has
    other columns (from another ifbatch version): `load_dataset` wants one set of columns. What it asks the store
    for a run's folders: one LIST of images/ and a HEAD a folder, not every table."""
    if ids is None or loc.fs.exists(table_path(loc, TOP)):
        return _write(loc, None, metadata_paths(loc))
    folders = {folder_of(i) for i in ids}
    t = _ok(read_manifest(loc, prefixes=folders))
    tables = _tables(t)
    if TOP in tables:  # images directly in images/: one table of them all
        return _write(loc, None, metadata_paths(loc))
    untouched = [table_path(loc, f) for f in _folders(loc) or [] if f not in folders][:8]
    other = next((p for p in untouched if loc.fs.exists(p)), None)  # (any folder with images has its table)
    if other and tables and _schema(loc, other) != next(iter(tables.values())).schema:
        return _write(loc, None, metadata_paths(loc))  # another version's columns in a folder this run did not touch
    have = {f: table_path(loc, f) for f in folders if f not in tables and loc.fs.exists(table_path(loc, f))}
    return _write(loc, tables, have)


def _ok(t: pa.Table) -> pa.Table:
    return t.filter(pc.and_(pc.equal(t.column("status"), "ok"), pc.is_valid(t.column("image_uri"))))


def _write(loc: Location, tables: dict[str, pa.Table] | None, stale: dict[str, str]) -> list[str]:
    """Write `tables` (None: every folder's, from the whole manifest) and remove the tables in `stale` that are
    not among them."""
    tables = _tables(_ok(read_manifest(loc))) if tables is None else tables
    for folder, path in stale.items():
        if folder not in tables:
            loc.fs.rm_file(path)
    written = []
    for folder in sorted(tables):
        buf = io.BytesIO()
        pq.write_table(tables[folder], buf, compression="zstd")
        path = table_path(loc, folder)
        loc.write_bytes(path, buf.getvalue())
        written.append(loc.uri(path))
    return written


def _schema(loc: Location, path: str) -> pa.Schema:
    with loc.fs.open(path, "rb") as f:
        return pq.read_schema(f)


def _tables(t: pa.Table) -> dict[str, pa.Table]:
    """The ok image records by the folder of their table, each with `file_name` relative to that folder."""
    marker = f"/{IMAGES_DIR}/"
    rels = [u.rsplit(marker, 1)[1] for u in t.column("image_uri").to_pylist()]
    keep = [c for c in t.column_names if c not in DROPPED and not c.startswith("seconds_")]
    rows: dict[str, list[int]] = {}
    names: list[str] = []
    for i, rel in enumerate(rels):
        folder, _, rest = rel.partition("/") if "/" in rel else (TOP, "", rel)
        rows.setdefault(folder, []).append(i)
        names.append(rest)
    table = t.select(keep).add_column(0, "file_name", pa.array(names, pa.string()))
    return {f: take(table, at) for f, at in rows.items()}  # (positions ascending: a block at a time)
