"""Small helpers shared by the pipeline tests."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ifbatch.tasks.outputs.manifest import read_manifest
from ifbatch.tasks.storage import locate

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "prompts.parquet"
SMALL = [
    "a photo of a cat",
    "a red car in the rain",
    "an oil painting of a castle",
    "a dog on a beach",
    "a blue boat at sea",
    "a forest in the snow",
]


def write_table(path: Path, columns: dict, schema: pa.Schema | None = None) -> str:
    pq.write_table(pa.table(columns, schema=schema), path)
    return str(path)


def manifest_rows(output: str) -> list[dict]:
    return read_manifest(locate(output)).to_pylist()


def read_bytes(uri: str) -> bytes:
    loc = locate(uri)
    with loc.fs.open(loc.root, "rb") as f:
        return f.read()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cli(*args: str, env: dict | None = None, timeout: float = 600, **popen) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("ifbatch")
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, **popen
    )
