"""Prove an output whole: every `ok` image in the manifest exists with its recorded sha256 and size, and every image
file belongs to a record. `repair` records the broken images as failed, so that the next run makes exactly those.

Images are read in parallel (a thread pool: the work is I/O, and hashlib releases the GIL on large buffers).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from ..storage import Location
from .images import IMAGES_DIR
from .manifest import RECORD_SCHEMA, read_manifest, write_part


@dataclass
class Problem:
    kind: str  # missing | corrupt | orphan
    uri: str
    id: str | None = None
    detail: str = ""

    def line(self) -> str:
        who = f"{self.id}: " if self.id else ""
        return f"{self.kind:8s} {who}{self.uri}{f' ({self.detail})' if self.detail else ''}"


@dataclass
class Report:
    output: str
    checked: int = 0  # ok records whose image was read
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0

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
        )


def _path(loc: Location, uri: str) -> str:
    """Where a recorded image is in the output being checked: its path below images/, under this output's root.
    An output copied or moved elsewhere (another bucket, another folder) is checked where it is now."""
    marker = f"/{IMAGES_DIR}/"
    if marker not in uri:
        return uri.split("://", 1)[1] if "://" in uri else uri
    return loc.path(IMAGES_DIR, uri.rsplit(marker, 1)[1])


def _check(loc: Location, rec: dict) -> Problem | None:
    path = _path(loc, rec["image_uri"])
    uri = loc.uri(path)
    try:
        data = loc.fs.cat_file(path)
    except FileNotFoundError:
        return Problem("missing", uri, rec["id"])
    size = rec.get("bytes")
    if size is not None and len(data) != size:
        return Problem("corrupt", uri, rec["id"], f"{len(data)} bytes, the manifest says {size}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != rec["sha256"]:
        return Problem("corrupt", uri, rec["id"], f"sha256 {digest[:12]}..., the manifest says {rec['sha256'][:12]}...")
    return None


def verify(
    loc: Location, workers: int = 16, progress: Callable[[int, int], None] | None = None
) -> tuple[Report, pa.Table]:
    """Check every ok image and list the image files no record names. Returns the report and the manifest's ok
    records (for repair)."""
    t0 = time.monotonic()
    report = Report(loc.uri(loc.root))
    manifest = read_manifest(loc)
    ok = manifest.filter(pc.equal(manifest.column("status"), "ok"))
    records = ok.select(["id", "image_uri", "sha256", "bytes"]).to_pylist()
    named = {_path(loc, u) for u in manifest.column("image_uri").to_pylist() if u}
    base = loc.path(IMAGES_DIR)
    loc.fs.invalidate_cache(base)
    files = loc.fs.find(base) if loc.fs.exists(base) else []
    for path in sorted(set(files) - named):
        if ".tmp-" not in path:  # a local write in flight (or killed in flight) is not an image yet
            report.problems.append(Problem("orphan", loc.uri(path)))
    done = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for problem in pool.map(lambda r: _check(loc, r), records):
            done += 1
            if problem is not None:
                report.problems.append(problem)
            if progress is not None:
                progress(done, len(records))
    report.checked = len(records)
    report.problems.sort(key=lambda p: (p.kind, p.uri))
    report.seconds = time.monotonic() - t0
    return report, ok


def repair(loc: Location, report: Report, ok: pa.Table) -> list[str]:
    """Record each missing or corrupt image as failed (a manifest part of its own, after every other part), so that
    the next run into this output regenerates exactly those. Orphans are listed, not deleted: a rerun overwrites
    any it makes again. Returns the parts written (one per models value: each record keeps its own)."""
    broken = {p.id: p for p in report.problems if p.id is not None}
    if not broken:
        return []
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
    for seq, models in enumerate(sorted(set(rows.column("models").to_pylist()), key=str)):  # as each image had it
        same = (
            rows.filter(pc.equal(rows.column("models"), models))
            if models is not None
            else rows.filter(pc.is_null(rows.column("models")))
        )
        parts.append(write_part(loc, same.select(RECORD_SCHEMA.names), run_id, models or "{}", seq))
    return parts
