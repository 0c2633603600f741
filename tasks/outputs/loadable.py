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
from .manifest import id_hash, read_manifest

METADATA = "metadata.parquet"  # in each folder of images/ that holds images
DROPPED = ("status", "error", "format", "image_uri", "shard", "member", "offset", "placement")  # not facts of the image
TOP = ""  # the folder key of images/ itself


def folder_of(row_id: str) -> str:
    """The first-level folder under images/ of an image file (output.shard_depth >= 1)."""
    return id_hash(row_id)[:2]


def metadata_paths(loc: Location) -> dict[str, str]:
    """The output's metadata tables, by folder (TOP: images/metadata.parquet)."""
    base = loc.path(IMAGES_DIR)
    loc.fs.invalidate_cache(base)
    if not loc.fs.exists(base):
        return {}
    found = loc.fs.glob(loc.path(IMAGES_DIR, "*", METADATA)) + loc.fs.glob(loc.path(IMAGES_DIR, METADATA))
    return {_folder_of_table(loc, p): p for p in found}


def _folder_of_table(loc: Location, path: str) -> str:
    rel = path[len(loc.path(IMAGES_DIR)) :].strip("/")
    return rel.split("/")[0] if "/" in rel else TOP


def write_image_metadata(loc: Location, ids: Iterable[str] | None = None) -> list[str]:
    """Write the metadata tables of the folders that hold `ids` (the images a run recorded, whatever their status;
    None: every folder), each for the manifest's ok image files in it; a folder left without one loses its table.
    Returns the URIs written. Every folder is rewritten instead when images/ has a table of its own (an output
    with images directly in images/, or from an ifbatch before per-folder tables) or a table with other columns
    (from another ifbatch version): `load_dataset` wants one set of columns."""
    have = metadata_paths(loc)
    folders = None if ids is None or TOP in have else {folder_of(i) for i in ids}
    t = read_manifest(loc) if folders is None else read_manifest(loc, prefixes=folders)
    t = t.filter(pc.and_(pc.equal(t.column("status"), "ok"), pc.is_valid(t.column("image_uri"))))
    tables = _tables(t)
    if folders is not None and TOP in tables:  # images directly in images/: one table of them all
        return write_image_metadata(loc)
    other = None if folders is None else next((p for f, p in have.items() if f not in folders), None)
    if other and tables and _schema(loc, other) != next(iter(tables.values())).schema:
        return write_image_metadata(loc)  # another version's columns in a folder this run did not touch
    written = []
    for folder in sorted(tables.keys() | (folders if folders is not None else set()) | have.keys()):
        if folders is not None and folder not in folders:
            continue
        path = loc.path(IMAGES_DIR, folder, METADATA) if folder else loc.path(IMAGES_DIR, METADATA)
        if folder not in tables:
            if folder in have:
                loc.fs.rm_file(path)
            continue
        buf = io.BytesIO()
        pq.write_table(tables[folder], buf, compression="zstd")
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
    return {f: table.take(pa.array(at, pa.int64())) for f, at in rows.items()}
