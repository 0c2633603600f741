"""The manifest: Parquet parts under <output>/manifest/, each written only after every image it names is durable.

A row is done when an `ok` record for its id exists. Parts are an append-only log named by run and sequence;
`read_manifest` keeps the latest record per id (a failed row that later succeeded shows once, as ok).
"""

from __future__ import annotations

import io
import json
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from .storage import Location

MANIFEST_DIR = "manifest"
SCHEMA = pa.schema([
    ("id", pa.string()), ("row", pa.int64()), ("prompt", pa.string()), ("negative_prompt", pa.string()),
    ("seed", pa.int64()), ("status", pa.string()), ("error", pa.string()),
    ("image_uri", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string()),
    ("nsfw", pa.bool_()), ("watermark_detected", pa.bool_()), ("watermarked", pa.bool_()),
    ("truncated", pa.bool_()), ("negative_truncated", pa.bool_()),
    ("stage_1_steps", pa.int64()), ("stage_1_timesteps", pa.string()), ("stage_1_guidance_scale", pa.float64()),
    ("stage_2_steps", pa.int64()), ("stage_2_timesteps", pa.string()), ("stage_2_guidance_scale", pa.float64()),
    ("stage_2_noise_level", pa.int64()),
    ("stage_3_steps", pa.int64()), ("stage_3_guidance_scale", pa.float64()), ("stage_3_noise_level", pa.int64()),
    ("seconds_encode", pa.float64()), ("seconds_stage_1", pa.float64()), ("seconds_stage_2", pa.float64()),
    ("seconds_stage_3", pa.float64()), ("seconds_write", pa.float64()),
    ("models", pa.string()), ("placement", pa.string()), ("run_id", pa.string()), ("written_at", pa.string()),
])


def part_paths(loc: Location) -> list[str]:
    base = loc.path(MANIFEST_DIR)
    if not loc.fs.exists(base):
        return []
    return sorted(p for p in loc.fs.ls(base, detail=False) if p.endswith(".parquet"))


def write_part(loc: Location, rows: list[dict], run_id: str, seq: int) -> str:
    """Write one part atomically; the caller guarantees every image named in `rows` is already durable."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    path = loc.path(MANIFEST_DIR, f"part-{run_id}-{seq:05d}.parquet")
    loc.write_bytes(path, buf.getvalue())
    return path


def read_manifest(loc: Location, columns: Iterable[str] | None = None) -> pa.Table:
    """All parts, the latest record per id; an empty table with the schema when nothing was written yet."""
    cols = list(columns) if columns else SCHEMA.names
    need = list(dict.fromkeys(["id", "run_id", *cols]))
    tables = []
    for i, path in enumerate(part_paths(loc)):
        with loc.fs.open(path, "rb") as f:
            t = pq.read_table(f, columns=need)
        tables.append(t.append_column("_part", pa.array([i] * t.num_rows, pa.int64())))
    if not tables:
        return SCHEMA.empty_table().select(cols)
    t = pa.concat_tables(tables)
    t = t.append_column("_pos", pa.array(range(t.num_rows), pa.int64()))
    last = t.group_by("id").aggregate([("_pos", "max")]).column("_pos_max")
    t = t.take(sorted(last.to_pylist()))  # input order of the surviving records
    return t.select(cols)


def done_ids(loc: Location) -> set[str]:
    t = read_manifest(loc, ["id", "status"])
    return {i for i, s in zip(t.column("id").to_pylist(), t.column("status").to_pylist()) if s == "ok"}


def models_json(models: dict) -> str:
    return json.dumps(models, sort_keys=True)
