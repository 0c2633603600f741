"""`ifbatch verify` and `ifbatch compact`: prove an output whole, mend it, and merge its manifest parts."""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from ifbatch.tasks.storage import storage_errors


def add_parsers(sub) -> None:
    v = sub.add_parser(
        "verify",
        help="check that every ok image in an output exists and matches its sha256 and size",
        description="Read the manifest of OUTPUT, read every ok image (a file, or a member of a WebDataset shard; "
        "in parallel) and check it against the sha256 and size recorded for it; list missing, corrupt and "
        "orphaned images (files, shards and samples no record names), and, as adoptable, whole images no record "
        "names that carry their whole record (a run killed before recording them left them). Exit status 0: "
        "whole; 1: something is wrong; 2: the output could not be read.",
    )
    v.add_argument("output", help="output folder or s3://bucket/prefix")
    v.add_argument(
        "--repair",
        action="store_true",
        help="record the adoptable images as they are, and the missing and corrupt ones as failed, so that the "
        "next `ifbatch run` into OUTPUT makes exactly those again; a damaged shard is removed and all of its images "
        "recorded as failed; orphaned shards and unfinished writes (*.tmp-<pid>) are removed, orphaned files "
        "listed, not deleted",
    )
    v.add_argument("--workers", type=int, default=16, help="images read at once (default 16)")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    c = sub.add_parser(
        "compact",
        help="merge an output's manifest parts into few large ones (safe to interrupt)",
        description="Merge every manifest part of OUTPUT into few, the latest record per image only; more than "
        "--part-rows records are split by the hash of their ids into 16, 256, ... parts, so that a later run reads "
        "only the parts its own images can be in. read_manifest gives the same result before and after, and after "
        "a crash mid-way. Runs do this for their own parts when they end.",
    )
    c.add_argument("output", help="output folder or s3://bucket/prefix")
    c.add_argument("--part-rows", type=int, default=None, help="records per merged part, about (default 4,096)")


def verify_command(args: argparse.Namespace) -> int:
    from ifbatch.tasks.outputs.lease import Lease, LeaseHeld
    from ifbatch.tasks.outputs.spill import spill_dir, spilled
    from ifbatch.tasks.outputs.verify import repair, verify

    loc = _locate(args.output)
    if loc is None:
        return 2
    bar, update = _bar(not args.no_progress)
    try:
        report, ok = verify(loc, workers=max(1, args.workers), progress=update)
    except (*storage_errors(), ValueError) as e:
        print(f"ifbatch: cannot verify {args.output!r}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.stop()
    for p in report.problems:
        print(p.line())
    print(report.summary())
    waiting = spilled(loc)
    if waiting:  # records of images already written: until a run writes them, those images look orphaned
        print(
            f"note: {len(waiting)} files (manifest parts, run records) an earlier run could not write wait in "
            f"{spill_dir(loc)}; the next run into {args.output} writes them first, and the images they record "
            f"are then no longer orphans"
        )
    if args.repair and not report.whole:
        try:  # mends the manifest: not while a run writes into it
            with Lease(loc, f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-repair").held():
                fixed = repair(loc, report, ok)
        except LeaseHeld as e:
            print(f"ifbatch: cannot repair: {e}", file=sys.stderr)
            return 2
        for uri in fixed.removed:
            print(f"removed {uri}")
        if fixed.adopted:
            print(f"recorded {fixed.adopted} whole, unrecorded images as they are (adopted)")
        if fixed.failed:
            print(
                f"recorded {fixed.failed} broken images as failed ({', '.join(fixed.parts)}); "
                f"rerun into this output to make them"
            )
    return 0 if report.whole else 1


def compact_command(args: argparse.Namespace) -> int:
    from ifbatch.tasks.outputs.compact import compact
    from ifbatch.tasks.outputs.lease import Lease, LeaseHeld

    loc = _locate(args.output)
    if loc is None:
        return 2
    try:
        with Lease(loc, f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-compact").held():
            rows = {} if args.part_rows is None else {"part_rows": max(1, args.part_rows)}
            written, removed = compact(loc, **rows)
    except LeaseHeld as e:
        print(f"ifbatch: cannot compact: {e}", file=sys.stderr)
        return 2
    except (*storage_errors(), ValueError) as e:
        print(f"ifbatch: cannot compact {args.output!r}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if not removed:
        print(f"{args.output}: nothing to merge (fewer than 2 manifest parts)")
    else:
        print(f"{args.output}: {len(removed)} manifest parts merged into {len(written)}")
    return 0


def _locate(output: str):
    from ifbatch.tasks.outputs.manifest import MANIFEST_DIR
    from ifbatch.tasks.outputs.spill import spill_dir, spilled
    from ifbatch.tasks.storage import locate

    try:
        loc = locate(output)
        loc.fs.invalidate_cache()
        if not loc.fs.exists(loc.path(MANIFEST_DIR)):
            # a run that ended before it recorded any image: what it left is listed (adoptable, or orphaned)
            if not any(loc.fs.exists(loc.path(sub)) for sub in ("images", "shards", "runs")):
                print(f"ifbatch: {output!r} has no manifest/ folder: not an ifbatch output", file=sys.stderr)
                return None
            waiting = spilled(loc)
            if waiting:
                print(
                    f"note: {output!r} has no manifest/ yet; {len(waiting)} records of a run that ended while the "
                    f"store was down wait in the spill folder {spill_dir(loc)}: the next run writes them",
                    file=sys.stderr,
                )
    except (*storage_errors(), ValueError) as e:
        print(f"ifbatch: cannot read {output!r}: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    return loc


def _bar(show: bool):
    """A rich progress bar on a terminal (stderr), updated from the reading threads."""
    if not show or not sys.stderr.isatty():
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("verifying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True)
    job = bar.add_task("images", total=None)
    bar.start()
    return bar, lambda done, total: bar.update(job, completed=done, total=total)
