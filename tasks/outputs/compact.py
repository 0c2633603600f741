"""Manifest compaction: many small parts (a long run writes one every 30 s or 256 records) merged into few, so that
resume and `verify` read a handful of files instead of thousands. More than `part_rows` records are split by the
hash of their ids into 16, 256, ... parts of at most about `part_rows` each (`-h<hex>` names: manifest.py), so that
a later run reads only the parts its own images' records can be in, whatever the output's size.

Crash-safe by order alone: the merged parts are written first (each write is atomic), under names that sort
right after the parts they replace, and only then are the old parts deleted. A crash in between leaves both; every
id's latest record (what `read_manifest` keeps) is then the merged copy of the same record, so nothing is lost or
duplicated, and the next compaction finishes the job.
"""

from __future__ import annotations

import datetime as dt
import re

import numpy as np

from ..storage import Location
from .manifest import id_hash, part_paths, read_manifest, take, write_table

PART = re.compile(r"^part-(?P<run>.+?)-(?:c\d{8}T\d{12}Z-(?:h[0-9a-f]{1,4}|\d{5})|\d{5})\.parquet$")
PART_ROWS = 4096  # records per merged part, about: what a run reads per image of its own in a large output
MAX_DIGITS = 4  # at most 65,536 split parts


def run_of(path: str) -> str:
    """The run id in a part's name (`part-<run>-<seq>.parquet`; merged: `part-<run>-c<stamp>-<seq>.parquet`, or
    `-c<stamp>-h<hex>.parquet` split by hash)."""
    name = path.rsplit("/", 1)[-1]
    m = PART.match(name)
    if not m:
        raise ValueError(f"{path!r} is not a manifest part name (part-<run id>-<seq>.parquet)")
    return m.group("run")


def compact(loc: Location, run_id: str | None = None, part_rows: int = PART_ROWS) -> tuple[list[str], list[str]]:
    """Merge the parts of one run (run_id) or of the whole output (None) into parts of about part_rows records at
    most (split by id hash), each id's latest record only. Returns (parts written, parts removed); nothing happens
    with fewer than 2 parts."""
    parts = part_paths(loc)
    if run_id is not None:
        parts = [p for p in parts if run_of(p) == run_id]
    if len(parts) < 2:
        return [], []
    written = merge(loc, parts, part_rows)
    loc.fs.rm(parts)  # on S3 a thousand per request; a crash in between leaves duplicates read_manifest hides
    return written, parts


def split_digits(rows: int, part_rows: int) -> int:
    """Hex digits of id hash to split `rows` records by: the fewest that leave about part_rows per part."""
    digits = 0
    while rows > part_rows * 16**digits and digits < MAX_DIGITS:
        digits += 1
    return digits


def merge(loc: Location, parts: list[str], part_rows: int = PART_ROWS) -> list[str]:
    """Write the latest record per id of `parts` (in manifest order) as new parts that sort right after the last of
    them: the same run id, then "c" and a stamp (a plain part's sequence is digits, which sort before "c"; a later
    merge of the same run has a later stamp), then `00000`, or `h<hex>` for each hash prefix when split. Later runs'
    parts still sort after."""
    table = read_manifest(loc, paths=parts)  # in batches: memory follows the records kept, not the parts
    stamp = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%fZ}"
    name = f"part-{run_of(parts[-1])}-c{stamp}"
    digits = split_digits(table.num_rows, part_rows)
    if digits == 0:
        return [write_table(loc, table, f"{name}-00000.parquet")]
    keys = np.array([id_hash(i)[:digits] for i in table.column("id").to_pylist()])
    prefixes, at = np.unique(keys, return_inverse=True)
    order = np.argsort(at, kind="stable")
    ends = np.cumsum(np.bincount(at, minlength=len(prefixes)))
    written = []
    for prefix, start, end in zip(prefixes, [0, *ends[:-1]], ends, strict=True):
        written.append(write_table(loc, take(table, order[start:end]), f"{name}-h{prefix}.parquet"))  # ascending
    return written
