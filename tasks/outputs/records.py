"""Per-run records next to the outputs: runs/<run_id>.json (config, versions, counts, throughput) and the
rejected rows with their reasons (runs/<run_id>-rejected.parquet)."""

from __future__ import annotations

import io
import json
import platform
import re
from importlib import metadata
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..inputs.prompts import Rejected
from ..storage import Location

PACKAGES = (
    "ifbatch",
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "ray",
    "prefect",
    "pyarrow",
    "s3fs",
    "numpy",
    "pillow",
)
SECRET = re.compile(r"(secret|token|password|passwd|credential|api_key|access_key)", re.I)


def versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def redact(obj: Any) -> Any:
    """Drop values whose key looks secret, at any depth (the config holds none today; keep it that way)."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if SECRET.search(str(k)) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def write_rejected(loc: Location, run_id: str, rejected: list[Rejected]) -> str | None:
    if not rejected:
        return None
    table = pa.Table.from_pylist(
        [r.__dict__ for r in rejected],
        schema=pa.schema([("row", pa.int64()), ("id", pa.string()), ("prompt", pa.string()), ("reason", pa.string())]),
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    path = loc.path("runs", f"{run_id}-rejected.parquet")
    loc.write_bytes(path, buf.getvalue())
    return loc.uri(path)


def write_run_record(loc: Location, run_id: str, record: dict[str, Any]) -> str:
    path = loc.path("runs", f"{run_id}.json")
    loc.write_bytes(path, json.dumps(redact(record), indent=1, sort_keys=True, default=str).encode())
    return loc.uri(path)
