"""The output formats, one class each: `files` (an image file per record under images/) and `webdataset` (records
point into tar shards under shards/). Everything that meets an output's images goes through them: verify (checks
and orphans), resume (what a killed run left that readers would see twice), --overwrite (what to delete) and
reading an image. (The stream's writers of each format: stream/writer.py writer_steps.) An output may hold
records of both kinds, when its format changed between runs: each record is held by the format it names.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from ..storage import TMP_MARK, Location
from .images import IMAGES_DIR, image_path, read_provenance
from .loadable import METADATA
from .shards import SHARDS_DIR, members, orphan_shards, recorded_shards, remove_orphan_shards, sample_key, shard_path
from .unrecorded import Unit, record_of

READERS = 16  # unrecorded images read at once (the work is I/O)

Check = tuple[int, Callable[[], list["Problem"]]]  # (images it covers, the check)


@dataclass
class Problem:
    kind: str  # missing | corrupt | orphan | adoptable | unfinished
    uri: str
    id: str | None = None
    detail: str = ""

    def line(self) -> str:
        who = f"{self.id}: " if self.id else ""
        return f"{self.kind:8s} {who}{self.uri}{f' ({self.detail})' if self.detail else ''}"


def compare(data: bytes, rec: dict, uri: str) -> Problem | None:
    """The image's bytes against its record's size and sha256."""
    size = rec.get("bytes")
    if size is not None and len(data) != size:
        return Problem("corrupt", uri, rec["id"], f"{len(data)} bytes, the manifest says {size}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != rec["sha256"]:
        return Problem("corrupt", uri, rec["id"], f"sha256 {digest[:12]}..., the manifest says {rec['sha256'][:12]}...")
    return None


class Files:
    name = "files"
    folder = IMAGES_DIR

    def holds(self, rec: dict) -> bool:
        return not rec.get("shard")

    def read(self, loc: Location, rec: dict) -> bytes:
        return loc.fs.cat_file(image_path(loc, rec["image_uri"]))

    def checks(self, loc: Location, recs: list[dict]) -> list[Check]:
        return [(1, lambda r=r: self._check(loc, r)) for r in recs]

    def _check(self, loc: Location, rec: dict) -> list[Problem]:
        path = image_path(loc, rec["image_uri"])
        uri = loc.uri(path)
        try:
            data = loc.fs.cat_file(path)
        except FileNotFoundError:
            return [Problem("missing", uri, rec["id"])]
        problem = compare(data, rec, uri)
        return [problem] if problem else []

    def unrecorded(self, loc: Location, manifest: pa.Table) -> list[Unit]:
        """Image files no record names, each read for the record it carries (outputs/unrecorded.py); one whose
        provenance names another id than its file's name is not taken over. (A rerun overwrites any file it makes
        again; none is removed.)"""
        named = {image_path(loc, u) for u in manifest.column("image_uri").to_pylist() if u}
        base = loc.path(IMAGES_DIR)
        loc.fs.invalidate_cache(base)
        files = loc.fs.find(base) if loc.fs.exists(base) else []
        index = loc.path(IMAGES_DIR, METADATA)
        # a local write in flight (or killed in flight) is not an image yet; the metadata table is the output's own
        paths = [p for p in sorted(set(files) - named) if TMP_MARK not in p and p != index]
        return read_units(self, loc, paths)

    def read_unit(self, loc: Location, path: str) -> Unit:
        uri = loc.uri(path)
        try:
            data = loc.fs.cat_file(path)
            rec = record_of(read_provenance(data), data, image_uri=uri)
        except Exception as e:  # not an image at all
            rec = f"it cannot be read as an image: {type(e).__name__}: {e}"
        if isinstance(rec, str):
            return Unit(uri, None, rec)
        name = posixpath.basename(path).rsplit(".", 1)[0]
        if name != rec["id"]:
            return Unit(uri, None, f"its provenance names image {rec['id']!r}, not {name!r}")
        return Unit(uri, [rec])

    def tidy(self, loc: Location) -> list[str]:
        """Before a resumed run: nothing (an unrecorded file is overwritten when its image is made again)."""
        return []

    def unit(self, loc: Location, ok: pa.Table, broken: dict[str, Problem], problems: list[Problem]) -> list[str]:
        """What `verify --repair` removes with the broken images: nothing (a file is its own unit; an orphaned
        file is listed, not removed)."""
        return []


class WebDataset:
    name = "webdataset"
    folder = SHARDS_DIR

    def holds(self, rec: dict) -> bool:
        return bool(rec.get("shard"))

    def read(self, loc: Location, rec: dict) -> bytes:
        """One range read of the member's bytes."""
        start = rec["offset"]
        return loc.fs.cat_file(shard_path(loc, rec["shard"]), start=start, end=start + rec["bytes"])

    def checks(self, loc: Location, recs: list[dict]) -> list[Check]:
        """Each shard read once, for all of its records."""
        by_shard: dict[str, list[dict]] = {}
        for r in recs:
            by_shard.setdefault(shard_path(loc, r["shard"]), []).append(r)
        return [(len(rs), lambda p=p, rs=rs: self._check(loc, p, rs)) for p, rs in by_shard.items()]

    def _check(self, loc: Location, path: str, recs: list[dict]) -> list[Problem]:
        """Read a shard once; check each recorded member, list the samples in it that no record names."""
        uri = loc.uri(path)
        try:
            data = loc.fs.cat_file(path)
        except FileNotFoundError:
            return [Problem("missing", f"{uri}#{r['member']}", r["id"], "the shard is missing") for r in recs]
        found = {name: (offset, size) for name, offset, size in members(data)}
        problems = []
        for r in recs:
            where = f"{uri}#{r['member']}"
            if r["member"] not in found:
                problems.append(Problem("missing", where, r["id"], "not in the shard (truncated?)"))
                continue
            offset, size = found[r["member"]]
            problem = compare(data[offset : offset + size], r, where)
            if problem is not None:
                problems.append(problem)
        keys = {r["member"].split(".", 1)[0] for r in recs}
        for name in sorted(found):
            if name.split(".", 1)[0] not in keys:
                problems.append(Problem("orphan", f"{uri}#{name}", None, "a sample no record names"))
        return problems

    def unrecorded(self, loc: Location, manifest: pa.Table) -> list[Unit]:
        """Shards that hold no ok image, each read for the records its samples carry (a shard is written whole, with
        one atomic put: it is taken over whole, or not at all)."""
        ok = manifest.filter(pc.equal(manifest.column("status"), "ok"))
        paths = orphan_shards(loc, recorded_shards(ok, loc))
        return read_units(self, loc, paths)

    def read_unit(self, loc: Location, path: str) -> Unit:
        uri = loc.uri(path)
        try:
            data = loc.fs.cat_file(path)
        except FileNotFoundError:
            return Unit(uri, None, "it is gone")
        samples: dict[str, dict[str, tuple[str, int, int]]] = {}
        for name, offset, size in members(data):
            key, _, ext = name.partition(".")
            samples.setdefault(key, {})[ext] = (name, offset, size)
        records = []
        for key, parts in samples.items():
            image = [(n, o, z) for ext, (n, o, z) in parts.items() if ext not in ("json", "txt")]
            if "json" not in parts or len(image) != 1:
                return Unit(uri, None, f"sample {key!r} has no image, or no .json")
            _, o, z = parts["json"]
            try:
                meta = json.loads(data[o : o + z])
            except ValueError:
                meta = None
            name, offset, size = image[0]
            rec = record_of(meta, data[offset : offset + size], shard=uri, member=name, offset=offset)
            if isinstance(rec, str):
                return Unit(uri, None, f"sample {key!r}: {rec}")
            if sample_key(rec["id"]) != key:
                return Unit(uri, None, f"sample {key!r} says it is image {rec['id']!r}")
            records.append(rec)
        if not records:
            return Unit(uri, None, "it holds no sample")
        return Unit(uri, records)

    def tidy(self, loc: Location) -> list[str]:
        """Before a resumed run: remove the shards no record names (a reader of shards/*.tar would see their
        images twice once the run makes them again)."""
        return remove_orphan_shards(loc)

    def unit(self, loc: Location, ok: pa.Table, broken: dict[str, Problem], problems: list[Problem]) -> list[str]:
        """What `verify --repair` removes with the broken images: a damaged shard whole (its other images are added
        to `broken`, to be made again) and every orphaned shard. Returns their paths."""
        shard_of = dict(zip(ok.column("id").to_pylist(), ok.column("shard").to_pylist(), strict=True))
        damaged = {shard_path(loc, shard_of[i]) for i in broken if shard_of.get(i)}
        for i, shard in shard_of.items():  # every image of a damaged shard goes with it
            if shard and i not in broken and shard_path(loc, shard) in damaged:
                broken[i] = Problem("missing", loc.uri(shard_path(loc, shard)), i, "in a damaged shard, removed")
        orphans = [p.uri for p in problems if p.kind == "orphan" and p.id is None and p.uri.endswith(".tar")]
        return sorted(damaged | {shard_path(loc, u) for u in orphans})


def read_units(fmt: Files | WebDataset, loc: Location, paths: list[str]) -> list[Unit]:
    """Each unrecorded file or shard read by its format, READERS at once (the work is I/O)."""
    with ThreadPoolExecutor(max_workers=READERS) as pool:
        return list(pool.map(lambda p: fmt.read_unit(loc, p), paths))


FORMATS: dict[str, Files | WebDataset] = {f.name: f for f in (Files(), WebDataset())}


def format_of(rec: dict) -> Files | WebDataset:
    """The format that holds a record's image."""
    return next(f for f in FORMATS.values() if f.holds(rec))


def read_image(loc: Location, rec: dict) -> bytes:
    """A recorded image's bytes, wherever its format keeps them."""
    return format_of(rec).read(loc, rec)
