"""The output formats, one class each: `files` (an image file per record under images/) and `webdataset` (records
point into tar shards under shards/). A format owns its whole life: the stream's writers of its images (`writers`:
outputs/writer.py's operators), reading an image back, verify's checks and orphans, resume's tidy-up (what a killed
run left that readers would see twice), --overwrite (its folder), repair's unit, and its end-of-run files. The run
chooses it once (`output.format`), and each manifest record names its format (`format`), so an output whose format
changed between runs holds records of both. A new format is a subclass of Format and `FORMATS.register(...)`
(tests/run/test_new_format.py adds Parquet rows holding the image bytes that way, with no product file changed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ifbatch.configs import ConfigError
from ifbatch.configs.schema import CascadeConfig

from ..storage import TMP_MARK, Location
from . import credentials
from .images import IMAGES_DIR, image_path, read_provenance
from .loadable import METADATA, write_image_metadata
from .shards import SHARDS_DIR, members, orphan_shards, recorded_shards, remove_orphan_shards, sample_key, shard_path
from .unrecorded import Unit, record_of
from .writer import ImageWriter, ShardWriter, WriterStep

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
    """The image's bytes against its record's size and sha256, and a signed image's content credentials (read by
    the C2PA library: outputs/credentials.py) against the signer its record names."""
    found = []
    if rec.get("c2pa_signer"):
        found += [credentials.problem(data, rec["c2pa_signer"]) or ""]
    size = rec.get("bytes")
    if size is not None and len(data) != size:  # (not hashed: the size says it already)
        found.append(f"{len(data)} bytes, the manifest says {size}")
    elif (digest := hashlib.sha256(data).hexdigest()) != rec["sha256"]:
        found.append(f"sha256 {digest[:12]}..., the manifest says {rec['sha256'][:12]}...")
    found = [f for f in found if f]
    return Problem("corrupt", uri, rec["id"], "; ".join(found)) if found else None


class Format:
    """An output format. `name`: output.format's value and each record's `format`; `folder`: where its images go
    under the output (--overwrite removes it); `remakes_in_place`: an image made with other settings can be made
    again in its place (data.on_changed_settings=remake)."""

    name = ""
    folder = ""
    remakes_in_place = False

    def writers(
        self, cfg: CascadeConfig, output: str, run_id: str, models: dict, ledger: Any = None
    ) -> list[WriterStep]:
        """The stream's writer operators, in order; the first encodes each image (ImageWriter). ledger: a Ray run's
        (stream/ray/ledger.py), which every write asks first."""
        raise NotImplementedError

    def encoder(self, cfg: CascadeConfig, output: str, run_id: str, models: dict, ledger: Any, to_files: bool):
        """The encoding writer step every format starts with: each ok row's image encoded with its provenance, and
        written as a file (to_files) or handed on as bytes (`payload`, `meta`) to the format's next writer."""
        kwargs = dict(cfg=cfg, output=output, models=models, run_id=run_id, ledger=ledger, fmt=self.name)
        return WriterStep(
            ImageWriter, {**kwargs, "to_files": to_files}, cfg.stage_3.batch_size, "numpy", 1.0,
            cfg.output.writer_cpus, calls=2,  # an upload overlaps the next encode
        )  # fmt: skip

    def read(self, loc: Location, rec: dict) -> bytes:
        raise NotImplementedError

    def checks(self, loc: Location, recs: list[dict]) -> list[Check]:
        raise NotImplementedError

    def unrecorded(self, loc: Location, manifest: pa.Table) -> list[Unit]:
        """What it wrote that no record names, each read for the records it carries (taken over, or orphans)."""
        return []

    def read_unit(self, loc: Location, path: str) -> Unit:
        raise NotImplementedError

    def tidy(self, loc: Location) -> list[str]:
        """Before a run that follows one that ended before recording every image it wrote: remove what readers
        would see twice once the run makes it again."""
        return []

    def unit(self, loc: Location, ok: pa.Table, broken: dict[str, Problem], problems: list[Problem]) -> list[str]:
        """What `verify --repair` removes with the broken images (adding to `broken` what goes with them)."""
        return []

    def finish(self, loc: Location, ids: list[str] | None = None) -> None:
        """The end of a run that recorded images (`ids`, whatever their status; None: after `verify --repair`, the
        whole output): the format's own files beside them."""


class Files(Format):
    name = "files"
    folder = IMAGES_DIR
    remakes_in_place = True  # a file is replaced whole

    def writers(self, cfg, output, run_id, models, ledger=None):
        """The encoders write each image as a file, durable before its record is returned."""
        return [self.encoder(cfg, output, run_id, models, ledger, to_files=True)]

    def finish(self, loc: Location, ids: list[str] | None = None) -> None:
        if loc.fs.exists(loc.path(IMAGES_DIR)):  # images/<ab>/metadata.parquet, for load_dataset("imagefolder")
            write_image_metadata(loc, ids)

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
        # a local write in flight (or killed in flight) is not an image yet; the metadata tables are the output's own
        paths = [p for p in sorted(set(files) - named) if TMP_MARK not in p and posixpath.basename(p) != METADATA]
        return read_units(self, loc, paths)

    def read_unit(self, loc: Location, path: str) -> Unit:
        uri = loc.uri(path)
        try:
            data = loc.fs.cat_file(path)
            rec = record_of(read_provenance(data), data, format=self.name, image_uri=uri)
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


class WebDataset(Format):
    name = "webdataset"
    folder = SHARDS_DIR

    def writers(self, cfg, output, run_id, models, ledger=None):
        """The encoders hand the bytes on to the shard writers, which take output.shard_samples images a call and
        write each batch as a shard (tar assembly and one upload: a quarter of the encoders' count is plenty)."""
        shards = dict(cfg=cfg, output=output, run_id=run_id, ledger=ledger)
        return [
            self.encoder(cfg, output, run_id, models, None, to_files=False),  # (the shard writers ask the ledger)
            WriterStep(ShardWriter, shards, cfg.output.shard_samples, "pyarrow", 0.25, SHARD_WRITER_CPUS),
        ]

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
            rec = record_of(meta, data[offset : offset + size], format=self.name, shard=uri, member=name, offset=offset)
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


def read_units(fmt: Format, loc: Location, paths: list[str]) -> list[Unit]:
    """Each unrecorded file or shard read by its format, READERS at once (the work is I/O)."""
    with ThreadPoolExecutor(max_workers=READERS) as pool:
        return list(pool.map(lambda p: fmt.read_unit(loc, p), paths))


SHARD_WRITER_CPUS = 0.25


class Formats(dict[str, Format]):
    """The output formats by name."""

    def register(self, fmt: Format) -> None:
        if not fmt.name or fmt.name in self:
            raise ValueError(f"a format needs a name of its own: {fmt.name!r} (the formats: {sorted(self)})")
        self[fmt.name] = fmt

    @contextlib.contextmanager
    def registered(self, fmt: Format) -> Iterator[None]:
        """`fmt` registered for the block (a test's)."""
        self.register(fmt)
        try:
            yield
        finally:
            del self[fmt.name]

    def of(self, cfg: CascadeConfig) -> Format:
        """The run's format (output.format)."""
        try:
            return self[cfg.output.format]
        except KeyError:
            raise ConfigError(
                f"output.format = {cfg.output.format!r} is not an output format; expected one of "
                f"{', '.join(sorted(self))}"
            ) from None


FORMATS = Formats({f.name: f for f in (Files(), WebDataset())})


def format_of(rec: dict) -> Format:
    """The format that holds a record's image: the one it names (a record from before records named it: shards
    are WebDataset's, the rest files)."""
    name = rec.get("format") or ("webdataset" if rec.get("shard") else "files")
    if name not in FORMATS:
        raise ConfigError(
            f"record {rec.get('id')!r} names output format {name!r}, which is not one of {', '.join(sorted(FORMATS))}"
        )
    return FORMATS[name]


def read_image(loc: Location, rec: dict) -> bytes:
    """A recorded image's bytes, wherever its format keeps them."""
    return format_of(rec).read(loc, rec)
