"""Manifest compaction: many small parts (a long run writes one every 30 s or 256 records) merged into few large
ones, so that resume and `verify` read a handful of files instead of thousands.

Crash-safe by order alone: the merged parts are written first (each write is atomic), under names that sort
right after the parts they replace, and only then are the old parts deleted. A crash in between leaves both; every
id's latest record (what `read_manifest` keeps) is then the merged copy of the same record, so nothing is lost or
duplicated, and the next compaction finishes the job.
"""

from __future__ import annotations

import datetime as dt
import re

from ..storage import Location
from .manifest import part_paths, read_manifest, write_table

PART = re.compile(r"^part-(?P<run>.+?)-(?:c\d{8}T\d{6}\d{6}Z-)?\d{5}\.parquet$")


def run_of(path: str) -> str:
    """The run id in a part's name (`part-<run>-<seq>.parquet`, or `part-<run>-c<stamp>-<seq>.parquet` merged)."""
    name = path.rsplit("/", 1)[-1]
    m = PART.match(name)
    if not m:
        raise ValueError(f"{path!r} is not a manifest part name (part-<run id>-<seq>.parquet)")
    return m.group("run")


def compact(loc: Location, run_id: str | None = None, part_rows: int = 1_000_000) -> tuple[list[str], list[str]]:
    """Merge the parts of one run (run_id) or of the whole output (None) into parts of at most part_rows records,
    each id's latest record only. Returns (parts written, parts removed); nothing happens with fewer than 2 parts."""
    parts = part_paths(loc)
    if run_id is not None:
        parts = [p for p in parts if run_of(p) == run_id]
    if len(parts) < 2:
        return [], []
    written = merge(loc, parts, part_rows)
    loc.fs.rm(parts)  # on S3 a thousand per request; a crash in between leaves duplicates read_manifest hides
    return written, parts


def merge(loc: Location, parts: list[str], part_rows: int = 1_000_000) -> list[str]:
    """Write the latest record per id of `parts` (in manifest order) as new parts that sort right after the last of
    them: the same run id, then "c" and a stamp (a plain part's sequence is digits, which sort before "c"; a later
    merge of the same run has a later stamp). Later runs' parts still sort after."""
    table = read_manifest(loc, paths=parts)  # in batches: memory follows the records kept, not the parts
    stamp = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%fZ}"
    last_run = run_of(parts[-1])
    written = []
    for seq, start in enumerate(range(0, max(table.num_rows, 1), part_rows)):
        written.append(write_table(loc, table.slice(start, part_rows), f"part-{last_run}-c{stamp}-{seq:05d}.parquet"))
    return written
