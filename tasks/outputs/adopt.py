"""Taking over whole images a run left without records, instead of making them again.

A run killed before its records reached the manifest (SIGKILL of its processes, the OOM killer, a preempted VM, a
lost head node) leaves images that are whole but unrecorded. Every run marks the output while it writes
(`runs/<run id>.open`) and removes its mark only once every image it wrote is recorded; a run that finds another
run's mark lists the output's unrecorded images (formats.py `unrecorded`: one LIST of images/ or shards/, then one
GET per unrecorded file or shard), and records as its own the ones this run would make exactly so (outputs/drift.py
`compare`: prompt, seed, every stage parameter, preprocessing, models, k, score floor, watermark). They are recorded
in a manifest part of their own (run_id: the run taking them over; times and placement null), `counts.adopted` in
the run record; their files keep their bytes and times. What
is not taken over is made again: a file is overwritten, a shard removed (formats.py `tidy`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from ifbatch.configs.schema import CascadeConfig

from ..storage import Location
from .drift import compare, filled
from .formats import FORMATS
from .manifest import DONE, SCHEMA, read_manifest, write_table
from .records import RUNS_DIR
from .unrecorded import Unit

OPEN = ".open"  # runs/<run id>.open: the run may have written images it has not recorded yet
BEHIND = ".behind"  # runs/<run id>.behind: the format's end-of-run files (formats.py `finish`) may lack its records


def mark_open(loc: Location, run_id: str, kind: str = OPEN) -> None:
    """Before a run writes its first image (OPEN) or record (BEHIND)."""
    doc = dict(run_id=run_id, host=socket.gethostname(), pid=os.getpid(), at=dt.datetime.now(dt.UTC).isoformat())
    loc.write_bytes(loc.path(RUNS_DIR, run_id + kind), json.dumps(doc).encode())


def mark_closed(loc: Location, run_id: str, kind: str = OPEN) -> None:
    """Once every image the run wrote is recorded, or taken over by a later run (OPEN); once the format's files
    include every record it wrote (BEHIND)."""
    path = loc.path(RUNS_DIR, run_id + kind)
    if loc.fs.exists(path):
        loc.fs.rm_file(path)


def open_runs(loc: Location, but: str | None = None, kind: str = OPEN) -> list[str]:
    """The runs that may have left unrecorded images in this output (OPEN), or records the format's files lack
    (BEHIND); not `but`: the run asking."""
    base = loc.path(RUNS_DIR)
    loc.fs.invalidate_cache(base)
    if not loc.fs.exists(base):
        return []
    names = [p.rsplit("/", 1)[-1] for p in loc.fs.ls(base, detail=False)]
    return sorted(n[: -len(kind)] for n in names if n.endswith(kind) and n[: -len(kind)] != but)


@dataclass
class Adopted:
    images: int = 0  # taken over
    units: list[str] = field(default_factory=list)  # their files or shards
    left: list[Unit] = field(default_factory=list)  # unrecorded, not taken over (made again), with why
    parts: list[str] = field(default_factory=list)
    others: int = 0  # of `left`, whole with their records, of images this run's table does not ask for


def unrecorded(loc: Location) -> tuple[list[Unit], pa.Table]:
    """Every unit no record names, of every format (an output may hold both); and the manifest's latest records."""
    manifest = read_manifest(loc, ["id", "status", "format", "image_uri", "shard"])
    return [u for fmt in FORMATS.values() for u in fmt.unrecorded(loc, manifest)], manifest


def take_over(loc: Location, rows: pa.Table, cfg: CascadeConfig, run_id: str) -> Adopted:
    """Record the unrecorded whole images of this run's rows that it would make exactly so; the rest are made
    again. A unit is taken over whole: every image in it is this run's, not done, made as this run would make it
    (a shard with one image that is not stays out, and is removed: its images are made again)."""
    units, manifest = unrecorded(loc)
    out = Adopted()
    readable = [u for u in units if u.records]
    out.left = [u for u in units if not u.records]
    if not readable:
        return out
    found = pa.Table.from_pylist([r for u in readable for r in u.records], schema=SCHEMA)
    drift = compare(filled(found, cfg), rows, cfg)
    done = manifest.filter(pc.is_in(manifest.column("status"), pa.array(DONE))).column("id").to_pylist()
    mine = set(drift.compared.to_pylist())
    ours = mine - set(drift.ids.to_pylist()) - set(done)
    taken: list[Unit] = []
    for u in readable:
        ids = u.ids
        if all(i in ours for i in ids) and len(set(ids)) == len(ids):
            ours -= set(ids)  # an image in two units is taken from the first only
            taken.append(u)
        else:
            u.why = u.why or "its images are not this run's, or were made otherwise, or are recorded elsewhere"
            out.left.append(u)
            out.others += not set(ids) & mine and not set(ids) & set(done)
    for u in taken:  # its best candidate passes this run's floor, if any (compared: drift._floor_changes)
        for r in u.records or []:
            r["min_clip_score"] = cfg.data.min_clip_score
    out.parts = record(loc, taken, run_id)
    out.images = sum(len(u.records or []) for u in taken)
    out.units = [u.uri for u in taken]
    return out


def record(loc: Location, units: list[Unit], run_id: str) -> list[str]:
    """Write the records of `units` (their images whole and durable) as a manifest part of `run_id`, the run
    taking them over."""
    rows = [{**r, "run_id": run_id} for u in units for r in u.records or []]
    if not rows:
        return []
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    stamp = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%fZ}"
    return [write_table(loc, table, f"part-{run_id}-adopted{stamp}-00000.parquet")]
