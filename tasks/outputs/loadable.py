"""What lets the standard tools open an output in one line: images/metadata.parquet, the table Hugging Face
`load_dataset("imagefolder", data_dir=".../images")` joins to the image files (its `file_name` column, relative to
images/), with each image's prompt, seed and parameters beside it. WebDataset shards need nothing more
(`webdataset.WebDataset(<the shards>)`).

Rewritten from the manifest at the end of every run and by `verify --repair`, so it names exactly the images the
manifest says are ok (a run killed before its end leaves the previous one; the next run rewrites it).
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..storage import Location
from .images import IMAGES_DIR
from .manifest import read_manifest

METADATA = "metadata.parquet"  # under images/
DROPPED = ("status", "error", "format", "image_uri", "shard", "member", "offset", "placement")  # not facts of the image


def write_image_metadata(loc: Location) -> str | None:
    """Write images/metadata.parquet for the manifest's ok image files; returns its URI (None, and no file, when
    the output holds no image files)."""
    path = loc.path(IMAGES_DIR, METADATA)
    t = read_manifest(loc)
    t = t.filter(pc.and_(pc.equal(t.column("status"), "ok"), pc.is_valid(t.column("image_uri"))))
    if t.num_rows == 0:
        if loc.fs.exists(path):
            loc.fs.rm_file(path)
        return None
    marker = f"/{IMAGES_DIR}/"
    names = [u.rsplit(marker, 1)[1] for u in t.column("image_uri").to_pylist()]
    keep = [c for c in t.column_names if c not in DROPPED and not c.startswith("seconds_")]
    table = t.select(keep)
    table = table.add_column(0, "file_name", pa.array(names, pa.string()))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    loc.write_bytes(path, buf.getvalue())
    return loc.uri(path)
