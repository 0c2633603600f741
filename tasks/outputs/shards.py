"""WebDataset shards: tar files under shards/ whose members follow the WebDataset convention, one sample per image:
`<key>.json` (how it was made), `<key>.png` (or .jpg/.webp) and `<key>.txt` (the prompt).

A shard is built whole in memory (webdataset's TarWriter), written with one atomic put, then its stats file, and
only then are its images recorded in the manifest (shard, member, and the member's byte offset, so that one image
can be read with a range request). A shard no record names was written by a run that ended before recording it;
its images are made again, so the next run removes it (`orphan_shards`) and readers never see a sample twice.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from ..storage import Location
from .manifest import read_manifest

SHARDS_DIR = "shards"  # under the output root
STATS_SUFFIX = ".stats.json"


def shard_name(run_id: str, writer: str, seq: int) -> str:
    """shards/<run>-<writer>-<seq>.tar: the writer's tag keeps two writer actors (or one restarted) apart."""
    return f"{run_id}-{writer}-{seq:05d}.tar"


def sample_key(image_id: str) -> str:
    """The WebDataset key of an image: its id with '.' escaped (readers split key and extension at the first
    dot; ids never hold '%', so the escape is unambiguous)."""
    return image_id.replace(".", "%2E")


@dataclass(frozen=True)
class Sample:
    key: str
    ext: str  # png | jpg | webp
    image: bytes
    meta: str  # the .json member (JSON text)
    prompt: str  # the .txt member


@dataclass(frozen=True)
class Member:
    name: str  # the image member, <key>.<ext>
    offset: int  # of its data in the tar


def build_shard(samples: list[Sample], mtime: float | None = None) -> tuple[bytes, list[Member]]:
    """The tar's bytes and, per sample, its image member with the data's offset."""
    from webdataset import TarWriter

    buf = io.BytesIO()
    with TarWriter(buf, encoder=False, mtime=time.time() if mtime is None else mtime) as tw:
        for s in samples:
            tw.write({"__key__": s.key, s.ext: s.image, "json": s.meta.encode(), "txt": s.prompt.encode()})
    data = buf.getvalue()
    offsets = {name: offset for name, offset, _ in members(data)}
    return data, [Member(f"{s.key}.{s.ext}", offsets[f"{s.key}.{s.ext}"]) for s in samples]


def members(data: bytes) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular member, as far as the tar can be read (a truncated shard
    yields the members before the damage)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for m in tf:
                if m.isfile():
                    yield m.name, m.offset_data, m.size
    except (tarfile.TarError, EOFError, OSError):
        return


def write_shard(loc: Location, name: str, data: bytes, stats: dict) -> str:
    """Write the shard (one atomic put), then its stats file; returns the shard's path."""
    path = loc.path(SHARDS_DIR, name)
    loc.write_bytes(path, data)
    loc.write_bytes(stats_path(path), json.dumps(stats, indent=1, sort_keys=True).encode())
    return path


def stats_path(shard_path: str) -> str:
    return shard_path[: -len(".tar")] + STATS_SUFFIX


def shard_paths(loc: Location) -> list[str]:
    base = loc.path(SHARDS_DIR)
    loc.fs.invalidate_cache(base)
    if not loc.fs.exists(base):
        return []
    return sorted(p for p in loc.fs.ls(base, detail=False) if p.endswith(".tar"))


def shard_path(loc: Location, uri: str) -> str:
    """Where a recorded shard is in this output: its name under this output's shards/ (a copied or moved output
    is read where it is now)."""
    return loc.path(SHARDS_DIR, uri.rsplit("/", 1)[-1])


def remove_shard(loc: Location, path: str) -> bool:
    """Remove the shard and its stats file; whether the shard was there."""
    was = loc.fs.exists(path)
    for p in (path, stats_path(path)):
        if loc.fs.exists(p):
            loc.fs.rm_file(p)
    return was


def recorded_shards(manifest: pa.Table, loc: Location) -> set[str]:
    """The shards (paths in this output) that hold an `ok` image of the manifest (read_manifest's table)."""
    ok = manifest.filter(pc.and_(pc.equal(manifest.column("status"), "ok"), pc.is_valid(manifest.column("shard"))))
    return {shard_path(loc, u) for u in pc.unique(ok.column("shard")).to_pylist()}


def orphan_shards(loc: Location, recorded: set[str]) -> list[str]:
    """Shards under shards/ that hold no recorded image (`recorded`: recorded_shards)."""
    return [p for p in shard_paths(loc) if p not in recorded and ".tmp-" not in p]


def remove_orphan_shards(loc: Location) -> list[str]:
    """Remove the shards no `ok` record names: written by a run that ended before recording them, or whose every
    image was recorded again since. Their images are (or will be) in other shards; left in place, a reader of
    shards/*.tar would see them twice. Returns their URIs."""
    if not loc.fs.exists(loc.path(SHARDS_DIR)):
        return []
    orphans = orphan_shards(loc, recorded_shards(read_manifest(loc, ["id", "status", "shard"]), loc))
    for p in orphans:
        remove_shard(loc, p)
    return [loc.uri(p) for p in orphans]
