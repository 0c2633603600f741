"""The spill folder: what a run could not write to its output because the store stayed down (manifest parts, the
run record) goes to a local folder named in the run's message, and the next run into the same output uploads it
before anything else, so that the images those records name count as done.

~/.cache/ifbatch/spill/<hash of the output URI>/<path under the output>, with the output's URI in OUTPUT.txt.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

from ..storage import Location, storage_errors, store_code, transient

ROOT = Path(os.environ.get("IFBATCH_SPILL_DIR", "~/.cache/ifbatch/spill")).expanduser()


def spill_dir(loc: Location) -> Path:
    uri = loc.uri(loc.root)
    return ROOT / hashlib.blake2b(uri.encode(), digest_size=8).hexdigest()


def spill(loc: Location, path: str, data: bytes) -> Path:
    """Keep `data`, meant for `path` under the output, in the output's spill folder; returns where."""
    folder = spill_dir(loc)
    rel = os.path.relpath(path, loc.root) if loc.protocol == "file" else path[len(loc.root) + 1 :]
    target = folder / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    (folder / "OUTPUT.txt").write_text(loc.uri(loc.root) + "\n")
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target


def spilled(loc: Location) -> list[Path]:
    """What earlier runs kept in the spill folder for this output and no run has written yet, oldest first."""
    folder = spill_dir(loc)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.rglob("*") if p.is_file() and p.name != "OUTPUT.txt"), key=os.path.getmtime)


def unspill(loc: Location) -> list[str]:
    """Upload whatever an earlier run spilled for this output, oldest first, deleting each once it is written;
    returns the paths written."""
    folder = spill_dir(loc)
    written = []
    for f in spilled(loc):
        if f.name.endswith(".tmp"):
            f.unlink()
            continue
        path = loc.path(*f.relative_to(folder).parts)
        loc.write_bytes(path, f.read_bytes())
        f.unlink()
        written.append(path)
    return written


class StoreDown(OSError):
    """A write failed for longer than the retry deadline; what it held was spilled (`spilled`)."""

    def __init__(self, message: str, spilled: Path):
        super().__init__(message)
        self.spilled = spilled


class DiskFull(StoreDown):
    """A local output's disk (or quota) is full: what the write held was spilled like a store that is down."""


def write_or_spill(loc: Location, path: str, data: bytes) -> str:
    """Write `data` to `path` under the output (retrying transient errors up to the deadline); if the store still
    refuses, keep it in the spill folder and raise StoreDown naming it. Returns the path written."""
    try:
        loc.write_bytes(path, data)
        return path
    except storage_errors() as e:
        where = spill(loc, path, data)
        kept = f"it is kept in {spill_dir(loc)} and the next run into {loc.uri(loc.root)} writes it first"
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(
                f"could not write {loc.uri(path)}: the disk is full ({e.strerror}); free space or write elsewhere, "
                f"then rerun; {kept}",
                where,
            ) from e
        code = store_code(e) or type(e).__name__
        retried = f"; retried for {loc.retry_s:.0f} s, s3.retry_deadline_s" if transient(e) and loc.retry_s else ""
        raise StoreDown(f"could not write {loc.uri(path)} ({code}: {e}{retried}); {kept}", where) from e
