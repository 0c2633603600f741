"""Prove an output whole: every `ok` image in the manifest (a file, or a member of a WebDataset shard) exists with
its recorded sha256 and size, and every image file, shard and sample belongs to a record. An image file or shard no
record names is `adoptable` when it is whole and carries its whole record (a run killed before recording it left
it: outputs/adopt.py), else `orphan`. `repair` records the adoptable ones and the broken images as failed, so that
the next run makes exactly those.

Images are read in parallel (a thread pool: the work is I/O, and hashlib releases the GIL on large buffers). The
checks of each kind of image are its format's (formats.py).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from ..storage import Location
from .adopt import record
from .formats import FORMATS, Problem
from .images import IMAGES_DIR
from .loadable import write_image_metadata
from .manifest import MANIFEST_DIR, RECORD_SCHEMA, read_manifest, write_part
from .records import RUNS_DIR
from .shards import remove_shard
from .unrecorded import Unit


@dataclass
class Report:
    output: str
    checked: int = 0  # ok records whose image was read
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0
    adoptable: list[Unit] = field(default_factory=list)  # unrecorded, whole, with their records

    @property
    def whole(self) -> bool:
        return not self.problems

    def count(self, kind: str) -> int:
        return sum(p.kind == kind for p in self.problems)

    def summary(self) -> str:
        state = "whole" if self.whole else "NOT whole"
        return (
            f"{self.output}: {state}: {self.checked} images checked in {self.seconds:.1f} s; "
            f"{self.count('missing')} missing, {self.count('corrupt')} corrupt, {self.count('orphan')} orphaned"
            + (f", {self.count('adoptable')} unrecorded but whole (adoptable)" if self.count("adoptable") else "")
            + (f", {self.count('unfinished')} unfinished writes" if self.count("unfinished") else "")
        )


def verify(
    loc: Location, workers: int = 16, progress: Callable[[int, int], None] | None = None
) -> tuple[Report, pa.Table]:
    """Check every ok image (a file, or a member of a shard: each shard is read once) and list the image files
    and shards no record names. Returns the report and the manifest's ok records (for repair)."""
    t0 = time.monotonic()
    report = Report(loc.uri(loc.root))
    manifest = read_manifest(loc)
    ok = manifest.filter(pc.equal(manifest.column("status"), "ok"))
    records = ok.select(["id", "image_uri", "shard", "member", "sha256", "bytes"]).to_pylist()
    for path in loc.temp_files(IMAGES_DIR, MANIFEST_DIR, RUNS_DIR):
        report.problems.append(Problem("unfinished", loc.uri(path), None, "a write cut short: --repair removes it"))
    jobs = []
    for fmt in FORMATS.values():  # each record is checked by the format that holds it (an output may hold both)
        held = [r for r in records if fmt.holds(r)]
        for unit in fmt.unrecorded(loc, manifest):
            report.adoptable += [unit] if unit.records else []
            report.problems.append(_unrecorded(unit))
        jobs += fmt.checks(loc, held)
    done = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for (n, _), problems in zip(jobs, pool.map(lambda job: job[1](), jobs), strict=True):
            done += n
            report.problems += problems
            if progress is not None:
                progress(done, len(records))
    report.checked = len(records)
    report.problems.sort(key=lambda p: (p.kind, p.uri))
    report.seconds = time.monotonic() - t0
    return report, ok


def _unrecorded(unit: Unit) -> Problem:
    if unit.records:
        n = len(unit.records)
        what = f"{n} whole images" if n > 1 else "a whole image"
        return Problem("adoptable", unit.uri, None, f"{what}, no record: --repair records them")
    return Problem("orphan", unit.uri, None, f"no record names it; {unit.why}")


@dataclass
class Repair:
    parts: list[str]  # manifest parts recording the broken images as failed
    failed: int  # images recorded as failed
    removed: list[str]  # shards removed (damaged: their images are made again; or orphaned), unfinished writes
    adopted: int = 0  # unrecorded whole images recorded


def repair(loc: Location, report: Report, ok: pa.Table) -> Repair:
    """Record each missing or corrupt image as failed (a manifest part of its own, after every other part), so that
    the next run into this output regenerates exactly those. What else goes is the format's (formats.py: `unit`):
    for WebDataset a damaged shard is the unit of repair -- every image in it is recorded as failed and the shard
    removed, so that readers of shards/ never meet the damage or, after the rerun, a second copy of a sample --
    and orphaned shards are removed too; orphaned files are listed, not deleted (a rerun overwrites any it makes
    again). Rewrites images/metadata.parquet."""
    adopted = [u for u in report.adoptable if not set(u.ids) & set(ok.column("id").to_pylist())]
    parts = record(loc, adopted, f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-verify")
    broken = {p.id: p for p in report.problems if p.id is not None}
    doomed: list[str] = []
    for fmt in FORMATS.values():
        doomed += fmt.unit(loc, ok, broken, report.problems)  # adds to `broken` what goes with a broken image
    parts += _record_failed(loc, ok, broken) if broken else []
    # after the failed records are durable: a crash in between leaves a file that verify lists
    removed = [loc.uri(p) for p in sorted(set(doomed)) if remove_shard(loc, p)]
    for p in report.problems:  # files a cut-short write left aside: never part of the output
        if p.kind == "unfinished":
            loc.fs.rm_file(p.uri.removeprefix("file://"))
            removed.append(p.uri)
    if broken or adopted:
        write_image_metadata(loc)
    return Repair(parts, len(broken), removed, sum(len(u.ids) for u in adopted))


def _record_failed(loc: Location, ok: pa.Table, broken: dict[str, Problem]) -> list[str]:
    rows = ok.filter(pc.is_in(ok.column("id"), value_set=pa.array(list(broken), pa.string())))
    reason = [f"verify: {broken[i].kind}: {broken[i].detail or broken[i].uri}" for i in rows.column("id").to_pylist()]
    now = dt.datetime.now(dt.UTC)
    n = rows.num_rows
    rows = rows.set_column(rows.schema.get_field_index("status"), "status", pa.array(["failed"] * n))
    rows = rows.set_column(rows.schema.get_field_index("error"), "error", pa.array(reason))
    stamp = now.isoformat(timespec="microseconds")
    rows = rows.set_column(rows.schema.get_field_index("written_at"), "written_at", pa.array([stamp] * n))
    run_id = f"{now:%Y%m%dT%H%M%SZ}-verify"
    parts = []
    models = rows.column("models")
    for seq, value in enumerate(sorted(set(models.to_pylist()), key=str)):  # as each image had it
        same = pc.is_null(models) if value is None else pc.equal(models, value)
        parts.append(write_part(loc, rows.filter(same).select(RECORD_SCHEMA.names), run_id, value or "{}", seq))
    return parts
