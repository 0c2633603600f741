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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from ..storage import Location
from .adopt import record
from .formats import FORMATS, Format, Problem, format_of
from .images import IMAGES_DIR
from .loadable import write_image_metadata
from .manifest import MANIFEST_DIR, RECORD_SCHEMA, part_paths, read_manifest, write_part
from .records import RUNS_DIR
from .shards import remove_shard
from .unrecorded import Unit

# the columns verify reads: what a record says of its image, and where its format keeps it
CHECKED = ["id", "status", "format", "image_uri", "shard", "member", "offset", "sha256", "bytes", "c2pa_signer"]
CHUNK = 10_000  # records turned into checks at once (a million records as Python dicts would hold ~1 GB)


@dataclass
class Figures:
    """Where verify's time went: reading the manifest, finding and reading what no record names, reading images."""

    parts: int = 0
    manifest_s: float = 0.0
    unrecorded: int = 0  # image files and shards no record names, each read for the record it carries
    unrecorded_s: float = 0.0
    images_s: float = 0.0

    def line(self, checked: int) -> str:
        return (
            f"manifest: {self.parts:,} part{'s' if self.parts != 1 else ''} read in {self.manifest_s:.1f} s; "
            f"unrecorded files and shards: {self.unrecorded:,} found and read in {self.unrecorded_s:.1f} s; "
            f"images: {checked:,} read and hashed in {self.images_s:.1f} s"
        )


@dataclass
class Report:
    output: str
    checked: int = 0  # ok records whose image was read
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0
    adoptable: list[Unit] = field(default_factory=list)  # unrecorded, whole, with their records
    figures: Figures = field(default_factory=Figures)

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
            + f"\n  ({self.figures.line(self.checked)})"
        )


def verify(
    loc: Location, workers: int = 16, progress: Callable[[int, int], None] | None = None
) -> tuple[Report, pa.Table]:
    """Check every ok image (a file, or a member of a shard: each shard is read once) and list the image files
    and shards no record names. Returns the report and the manifest's ok records (CHECKED columns, for repair).
    Memory follows the records, not the parts or the images: the manifest is read in batches (read_manifest) and
    the images CHUNK records at a time."""
    t0 = time.monotonic()
    report = Report(loc.uri(loc.root))
    fig = report.figures
    paths = part_paths(loc)
    manifest = read_manifest(loc, CHECKED, paths=paths)
    fig.parts, fig.manifest_s = len(paths), time.monotonic() - t0
    ok = manifest.filter(pc.equal(manifest.column("status"), "ok"))
    for path in loc.temp_files(IMAGES_DIR, MANIFEST_DIR, RUNS_DIR):
        report.problems.append(Problem("unfinished", loc.uri(path), None, "a write cut short: --repair removes it"))
    t1 = time.monotonic()
    for fmt in FORMATS.values():  # an output may hold both formats' images
        for unit in fmt.unrecorded(loc, manifest):
            report.adoptable += [unit] if unit.records else []
            report.problems.append(_unrecorded(unit))
            fig.unrecorded += 1
    del manifest
    t2 = time.monotonic()
    fig.unrecorded_s = t2 - t1
    done = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for recs in _chunks(ok):
            held: dict[Format, list[dict]] = {}  # each record's format, worked out once
            for r in recs:
                held.setdefault(format_of(r), []).append(r)
            jobs = [job for fmt, rs in held.items() for job in fmt.checks(loc, rs)]
            for (n, _), problems in zip(jobs, pool.map(lambda job: job[1](), jobs), strict=True):
                done += n
                report.problems += problems
                if progress is not None:
                    progress(done, ok.num_rows)
    fig.images_s = time.monotonic() - t2
    report.checked = ok.num_rows
    report.problems.sort(key=lambda p: (p.kind, p.uri))
    report.seconds = time.monotonic() - t0
    return report, ok


def _chunks(ok: pa.Table) -> Iterator[list[dict]]:
    """The ok records, about CHUNK at a time, every record of a shard in the same chunk (a shard is read once)."""
    carry: list[dict] = []
    for batch in ok.sort_by([("shard", "ascending")]).to_batches(max_chunksize=CHUNK):
        recs = carry + batch.to_pylist()
        cut = len(recs)
        while cut and recs[-1]["shard"] and recs[cut - 1]["shard"] == recs[-1]["shard"]:
            cut -= 1  # the last shard may go on in the next batch
        if cut:
            yield recs[:cut]
        carry = recs[cut:]
    if carry:
        yield carry


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
    again). Rewrites every images/<ab>/metadata.parquet."""
    recorded = set(ok.column("id").to_pylist())
    adopted = [u for u in report.adoptable if not set(u.ids) & recorded]
    parts = record(loc, adopted, f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-verify")
    broken = {p.id: p for p in report.problems if p.id is not None}
    doomed: list[str] = []
    for fmt in FORMATS.values():
        doomed += fmt.unit(loc, ok, broken, report.problems)  # adds to `broken` what goes with a broken image
    parts += _record_failed(loc, broken) if broken else []
    # after the failed records are durable: a crash in between leaves a file that verify lists
    removed = [loc.uri(p) for p in sorted(set(doomed)) if remove_shard(loc, p)]
    for p in report.problems:  # files a cut-short write left aside: never part of the output
        if p.kind == "unfinished":
            loc.fs.rm_file(p.uri.removeprefix("file://"))
            removed.append(p.uri)
    if broken or adopted:
        write_image_metadata(loc)
    return Repair(parts, len(broken), removed, sum(len(u.ids) for u in adopted))


def _record_failed(loc: Location, broken: dict[str, Problem]) -> list[str]:
    rows = read_manifest(loc, ids=broken)  # their whole records (verify read only the columns it checks)
    rows = rows.filter(pc.equal(rows.column("status"), "ok"))
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
