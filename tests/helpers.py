"""Small helpers shared by the pipeline tests."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ifbatch.configs.schema import STAGES
from ifbatch.tasks.outputs.manifest import RECORD_SCHEMA, read_manifest
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


def writer_rows(pixels: np.ndarray, failed: int = 0) -> dict[str, np.ndarray]:
    """A batch as the stream hands it to the writer: one row per image in `pixels` (n, h, w, 3 uint8), the last
    `failed` of them failed upstream."""
    n, ok = len(pixels), len(pixels) - failed
    b = {
        "id": np.array([f"r{i}" for i in range(n)], object),
        "row": np.arange(n),
        "prompt_id": np.array([f"r{i}" for i in range(n)], object),
        "image_index": np.zeros(n, np.int32),
        "seed": np.arange(n) + 7,
        "prompt": np.array(["p"] * n, object),
        "negative_prompt": np.array([""] * n, object),
        "error": np.array([""] * ok + ["stage_2: RuntimeError: boom"] * failed, object),
        "image": pixels,
        "truncated": np.zeros(n, bool),
        "negative_truncated": np.zeros(n, bool),
        "nsfw": np.array([0] * ok + [-1] * failed, np.int8),
        "watermark_detected": np.array([1] * ok + [-1] * failed, np.int8),
        "watermarked": np.ones(n, bool),
    }
    for f in RECORD_SCHEMA:
        if f.name.startswith("stage_"):
            b[f.name] = np.full(n, None if f.name.endswith("timesteps") else 4, object)
    for s in STAGES:
        b[f"seconds_{s}"] = np.array([0.1] * ok + [np.nan] * failed)
        b[f"placement_{s}"] = np.full(n, json.dumps({"node": "n1", "gpus": ["0"]}), object)
    return b
