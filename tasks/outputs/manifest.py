"""The manifest: Parquet parts under <output>/manifest/, each written only after every image it names is durable.

A row is done when an `ok` record for its id exists, or a `filtered` one (its best candidate scored under
data.min_clip_score: a rerun does not make it again). Parts are an append-only log named by run and sequence;
`read_manifest` keeps the latest record per id (a failed row that later succeeded shows once, as ok).

Merged parts (outputs/compact.py) of many records are split by the hash of their ids (`id_hash`, the same hash
that places an image file under images/): a part named `...-h<hex>.parquet` holds only ids whose hash starts with
<hex>. What a run reads for its own images (resume) or folders (images/<ab>/metadata.parquet) is then those parts
and the unsplit ones, not the whole output.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ifbatch.configs.schema import STAGES

from ..inputs.params import param_fields
from ..storage import Location
from .spill import write_or_spill

MANIFEST_DIR = "manifest"
# One record per image, as the writer makes it (columnar, no per-run facts). Its `format` (outputs/formats.py) says
# where the image is: a file (image_uri), or a member of a container (shard, member, and the offset of its bytes
# in it: a WebDataset tar shard) ...
RECORD_SCHEMA = pa.schema(
    [
        ("id", pa.string()), ("row", pa.int64()), ("prompt_id", pa.string()), ("image_index", pa.int32()),
        ("prompt", pa.string()), ("negative_prompt", pa.string()),
        ("seed", pa.int64()), ("status", pa.string()), ("error", pa.string()),
        ("format", pa.string()),
        ("image_uri", pa.string()), ("shard", pa.string()), ("member", pa.string()), ("offset", pa.int64()),
        ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string()), ("bytes", pa.int64()),
        ("c2pa_signer", pa.string()),
        ("nsfw", pa.bool_()), ("watermark_detected", pa.bool_()), ("watermarked", pa.bool_()),
        ("truncated", pa.bool_()), ("negative_truncated", pa.bool_()), ("text_preprocessing", pa.string()),
        ("clip_score", pa.float32()), ("candidate", pa.int16()), ("candidate_seed", pa.int64()),
        ("candidate_scores", pa.list_(pa.float32())),
        ("candidates_per_image", pa.int16()), ("min_clip_score", pa.float32()),
        *param_fields(),
        *[(f"seconds_{stage}", pa.float64()) for stage in STAGES], ("seconds_write", pa.float64()),
        ("placement", pa.string()), ("written_at", pa.string()),
    ]
)  # fmt: skip
# ... and the facts of its run, added once per part: the models (source, commit, dtype) and the run id.
RUN_FIELDS = [pa.field("models", pa.string()), pa.field("run_id", pa.string())]
SCHEMA = pa.schema(list(RECORD_SCHEMA) + RUN_FIELDS)

READERS = 16  # manifest parts read at once (resume, verify, compact: a long run writes thousands)
BATCH = 512  # manifest parts held at once before they are cut down to their latest records


BUCKET = re.compile(r"-h(?P<hex>[0-9a-f]{1,4})\.parquet$")  # a merged part of the ids whose hash starts with <hex>


def id_hash(row_id: str) -> str:
    """16 hex digits of an id's hash: where its image file goes (images/<ab>/<cd>/) and which split merged part
    holds its record."""
    return hashlib.blake2b(row_id.encode(), digest_size=8).hexdigest()


def bucket_of(path: str) -> str | None:
    """The hash prefix a split merged part holds (None: a part of any ids)."""
    m = BUCKET.search(path)
    return m.group("hex") if m else None


def parts_of(paths: list[str], prefixes: Iterable[str]) -> list[str]:
    """Of `paths`, the parts that may hold a record of an id whose hash starts with one of `prefixes`: every part
    not split by hash, and the split ones whose prefix and one of `prefixes` agree as far as both go."""
    buckets = {p: bucket_of(p) for p in paths}
    lengths = {len(b) for b in buckets.values() if b}
    if not lengths:
        return list(paths)
    wanted = set(prefixes)
    heads = {w[:k] for w in wanted for k in lengths if len(w) >= k}  # parts the prefix's ids are all in
    shorter = tuple(w for w in wanted if len(w) < max(lengths))  # (a folder's prefix: parts it spans)
    return [p for p, b in buckets.items() if b is None or b in heads or (shorter and b.startswith(shorter))]


def part_paths(loc: Location) -> list[str]:
    base = loc.path(MANIFEST_DIR)
    loc.fs.invalidate_cache(base)  # s3fs keeps listings: another process (a rerun, verify) may have written since
    if not loc.fs.exists(base):
        return []
    return sorted(p for p in loc.fs.ls(base, detail=False) if p.endswith(".parquet"))


def write_part(loc: Location, records: pa.Table, run_id: str, models: str, seq: int, spill: bool = False) -> str:
    """Write one part atomically; the caller guarantees every image named in `records` is already durable.
    spill: when the store stays down, keep the part in the spill folder and raise StoreDown (outputs/spill.py)."""
    n = records.num_rows
    table = records.select(RECORD_SCHEMA.names).cast(RECORD_SCHEMA)
    table = pa.Table.from_arrays([*table.columns, pa.repeat(models, n), pa.repeat(run_id, n)], schema=SCHEMA)
    return write_table(loc, table, f"part-{run_id}-{seq:05d}.parquet", spill)


def write_table(loc: Location, table: pa.Table, name: str, spill: bool = False) -> str:
    """One part file under manifest/, written whole (zstd Parquet, atomically); returns its path."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    path = loc.path(MANIFEST_DIR, name)
    if spill:
        return write_or_spill(loc, path, buf.getvalue())
    loc.write_bytes(path, buf.getvalue())
    return path


def _read_part(loc: Location, path: str, columns: list[str]) -> pa.Table:
    """A part's columns; one an older ifbatch did not write comes back as nulls. Read whole in one request (a part
    is one flush of records, small; a ranged open costs a HEAD and a GET per footer and column)."""
    pf = pq.ParquetFile(pa.BufferReader(loc.fs.cat_file(path)))
    have = set(pf.schema_arrow.names)
    t = pf.read(columns=[c for c in columns if c in have])
    for c in columns:
        if c not in have:
            t = t.append_column(SCHEMA.field(c), pa.nulls(t.num_rows, SCHEMA.field(c).type))
    return t.select(columns)


def read_manifest(
    loc: Location,
    columns: Iterable[str] | None = None,
    ids: Iterable[str] | None = None,
    paths: list[str] | None = None,
    prefixes: Iterable[str] | None = None,
) -> pa.Table:
    """All parts (or `paths`), the latest record per id (of `ids` only, or of the ids whose hash starts with one of
    `prefixes`, when given: then only the parts that may hold them are read); an empty table with the schema when
    nothing was written yet. Memory follows the records, not the parts: parts are read BATCH at a time and each
    batch is cut down to its latest records and made one contiguous table before the next is read (a part read on
    its own costs ~80 KB of Arrow and Python objects, whatever it holds: 100,000 parts held at once took ~8 GB).
    A batch's parts are read READERS at once (on S3, as many requests)."""
    cols = list(columns) if columns else SCHEMA.names
    need = list(dict.fromkeys(["id", "written_at", *cols]))
    wanted = None if ids is None else pa.array(sorted(set(ids)), pa.string())
    paths = part_paths(loc) if paths is None else paths
    heads = None if prefixes is None else tuple(sorted(set(prefixes)))
    if wanted is not None and any(bucket_of(p) for p in paths):  # their records are in their hashes' parts only
        paths = parts_of(paths, {id_hash(i) for i in wanted.to_pylist()})
    elif heads is not None:
        paths = parts_of(paths, heads)
    kept = []
    with ThreadPoolExecutor(max_workers=min(READERS, max(1, len(paths)))) as pool:  # parts are I/O: read at once
        for start in range(0, len(paths), BATCH):
            # one path at a time: a list given to fsspec's cat is globbed, and an output's name may hold [ ] or *
            t = pa.concat_tables(pool.map(lambda path: _read_part(loc, path, need), paths[start : start + BATCH]))
            if wanted is not None:
                t = t.filter(pc.is_in(t.column("id"), value_set=wanted))
            elif heads is not None:
                t = t.filter(pa.array([id_hash(i).startswith(heads) for i in t.column("id").to_pylist()], pa.bool_()))
            # the latest of a batch's records keep their order: the latest of the batches' latest is the latest
            kept.append(contiguous(latest_per_id(t)))
    if not kept:
        return SCHEMA.empty_table().select(cols)
    return contiguous(latest_per_id(pa.concat_tables(kept)).select(cols))


def latest_per_id(t: pa.Table) -> pa.Table:
    """The latest record of each id: the last written (`written_at`, to the microsecond; parts' order breaks ties
    and orders records without it), in the order the surviving records came. Not the parts' names alone: a
    `verify --repair` part and a rerun begun in the same second would otherwise sort by their random suffixes."""
    t = t.append_column("_pos", pa.array(range(t.num_rows), pa.int64()))
    order = pc.sort_indices(t, sort_keys=[("written_at", "ascending", "at_start"), ("_pos", "ascending", "at_start")])
    ranked = t.select(["id"]).take(order).append_column("_rank", pa.array(range(t.num_rows), pa.int64()))
    ranked = ranked.append_column("_at", order)
    best = ranked.group_by("id").aggregate([("_rank", "max")]).column("_rank_max")
    rows = pc.take(ranked.column("_at"), best)  # positions in t of each id's latest record
    return take(t, pc.take(rows, pc.sort_indices(rows))).drop_columns(["_pos"])


CHUNK_ROWS = 1 << 16  # rows of a read's result in one chunk: a string column's chunk holds at most 2 GiB (32 KB a row)


def take(t: pa.Table, indices) -> pa.Table:
    """t.take(indices) for ascending `indices`, a block of CHUNK_ROWS rows of t at a time, each block's rows one
    chunk: taking from a whole output's records at once concatenates each column's chunks first, which overflows
    a string column's 32-bit offsets (seen at ten million records: `offset overflow while concatenating arrays`)."""
    if t.num_rows <= CHUNK_ROWS:
        return t.take(indices)
    at = np.asarray(indices, dtype=np.int64)
    starts = range(0, t.num_rows, CHUNK_ROWS)
    bounds = np.searchsorted(at, [*starts, t.num_rows])
    blocks = [
        t.slice(start, CHUNK_ROWS).take(pa.array(at[lo:hi] - start))
        for start, lo, hi in zip(starts, bounds[:-1], bounds[1:], strict=True)
        if hi > lo
    ]
    return pa.concat_tables(blocks) if blocks else t.slice(0, 0)


def contiguous(t: pa.Table) -> pa.Table:
    """t.combine_chunks(), in chunks of CHUNK_ROWS rows (see take)."""
    if t.num_rows <= CHUNK_ROWS:
        return t.combine_chunks()
    return pa.concat_tables([t.slice(i, CHUNK_ROWS).combine_chunks() for i in range(0, t.num_rows, CHUNK_ROWS)])


DONE = ("ok", "filtered")  # the statuses a rerun does not make again


def done_records(
    loc: Location, columns: Iterable[str] = ("id", "status"), ids: Iterable[str] | None = None
) -> pa.Table:
    """The latest record of each id (of `ids` only, when given) whose status is `ok` or `filtered`, with `columns`
    (status among them)."""
    t = read_manifest(loc, list(dict.fromkeys(["status", *columns])), ids=ids)
    return t.filter(pc.is_in(t.column("status"), pa.array(DONE)))
