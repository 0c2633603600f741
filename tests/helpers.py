"""Small helpers shared by the pipeline tests."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ifbatch.configs.schema import CASCADE
from ifbatch.tasks.inputs.expand import image_id
from ifbatch.tasks.outputs.formats import read_image
from ifbatch.tasks.outputs.images import image_relpath
from ifbatch.tasks.outputs.manifest import RECORD_SCHEMA, read_manifest
from ifbatch.tasks.outputs.shards import sample_key
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
    for s in CASCADE:
        b[f"seconds_{s}"] = np.array([0.1] * ok + [np.nan] * failed)
        b[f"placement_{s}"] = np.full(n, json.dumps({"node": "n1", "gpus": ["0"]}), object)
    return b


def check_outputs(output: str, expect_ids: set[str]) -> list[dict]:
    loc = locate(output)
    rows = read_manifest(loc).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(expect_ids)  # exactly one record per row
    for r in rows:
        assert r["status"] == "ok", r
        data = read_image(loc, r)
        assert sha256(data) == r["sha256"] and (r["width"], r["height"]) == (256, 256)
        if r["shard"] is None:
            assert r["image_uri"].endswith(image_relpath(r["id"], load_tiny().output).split("/", 1)[1])
        else:
            assert r["image_uri"] is None and r["member"] == f"{sample_key(r['id'])}.png"
        models = json.loads(r["models"])
        assert set(models) == {"text_encoder", "stage_1", "scorer", "stage_2", "stage_3", "safety"}
        assert r["clip_score"] is not None and r["candidate"] == 0 and r["candidate_seed"] == r["seed"]
        assert models["stage_1"]["dtype"] == "float32" and r["stage_1_steps"] == 4 and r["stage_3_noise_level"] == 100
        assert r["watermarked"] is True
        assert r["placement"] is None or r["seconds_stage_3"] > 0  # (an image taken over was not timed)
    return rows


def load_tiny():
    from ifbatch.configs import load_config

    return load_config("tiny")


def table_ids(prompts: str) -> list[str]:
    from ifbatch.tasks.inputs.prompts import read_prompts

    return read_prompts(prompts, load_tiny()).rows.column("id").to_pylist()


def shard_samples(output: str) -> list[str]:
    """The keys of every sample in the output's shards, read with the webdataset library (an s3:// output through
    fsspec), each image checked against its .json."""
    import webdataset as wds

    from ifbatch.tasks.outputs.shards import shard_paths

    loc = locate(output)
    urls = [loc.uri(p) for p in shard_paths(loc)]
    wds.gopen_schemes["s3"] = lambda url, mode="rb", bufsize=8192, **kw: fsspec.open(url, mode).open()
    keys = []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        assert sample_key(meta["id"]) == sample["__key__"] and sample["txt"].decode() == meta["prompt"]
        keys.append(sample["__key__"])
    return keys


def image_ids(prompts: str, overrides: list[str]) -> dict[str, tuple[str, int]]:
    """{image id: (its row's id, the row's seed)} for every image the table asks for."""
    from ifbatch.configs import load_config
    from ifbatch.tasks.inputs.prompts import read_prompts

    rows = read_prompts(prompts, load_config("tiny", overrides)).rows.to_pylist()
    return {image_id(r["id"], k): (r["id"], r["seed"]) for r in rows for k in r["images"]}


def part_ids(loc, path):
    with loc.fs.open(path, "rb") as f:
        t = pq.read_table(f, columns=["id", "status"]).to_pylist()
    return [r["id"] for r in t if r["status"] == "ok"]


def each_image_once(output: str, prompts: str) -> list[dict]:
    """Every image of the table is in the output, checked (check_outputs), and recorded ok exactly once in the
    manifest parts themselves (read_manifest would hide a second record)."""
    rows = check_outputs(output, set(table_ids(prompts)))
    loc = locate(output)
    from ifbatch.tasks.outputs.manifest import part_paths

    raw_ok = [i for p in part_paths(loc) for i in part_ids(loc, p)]
    assert sorted(raw_ok) == sorted(table_ids(prompts)), "an image was recorded twice, or not at all"
    return rows


def session_processes(sid: int) -> list[str]:
    """The processes still alive in the run's session (the run, its Prefect API, its Ray cluster)."""
    res = subprocess.run(["ps", "-e", "-o", "sid=,pid=,stat=,args="], capture_output=True, text=True)
    alive = []
    for line in res.stdout.splitlines():
        s, pid, stat, args = (line.split(None, 3) + [""])[:4]
        if int(s) == sid and not stat.startswith("Z"):
            alive.append(f"{pid} {args[:100]}")
    return alive


def wait_gone(sid: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while session_processes(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not session_processes(sid), session_processes(sid)


def loaded_with_datasets(output: str, cache: str) -> set[str]:
    """Open a files output with `load_dataset("imagefolder")`, as the README shows; check every image and its
    columns against the manifest; the ids it holds."""
    import datasets

    loc = locate(output)
    manifest = {r["id"]: r for r in read_manifest(loc).to_pylist() if r["status"] == "ok"}
    opts = {"storage_options": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}} if output.startswith("s3://") else {}
    files = {"data_files": f"{output}/images/**"} if output.startswith("s3://") else {"data_dir": f"{output}/images"}
    # The suite runs with HF_HUB_OFFLINE=1 (no test may reach a model hub); datasets then refuses every remote URL,
    # also the tests' own S3 server, so it is lifted for this read only.
    with mock.patch.object(datasets.config, "HF_HUB_OFFLINE", not output.startswith("s3://")):
        ds = datasets.load_dataset(
            "imagefolder", split="train", cache_dir=cache, streaming=output.startswith("s3://"), **files, **opts
        )
    seen = set()
    for row in ds:  # each image decoded by datasets is the image the manifest names, with its sha256 and size
        rec = manifest[row["id"]]
        data = read_image(loc, rec)
        assert sha256(data) == rec["sha256"] and len(data) == rec["bytes"]
        assert np.array_equal(np.asarray(row["image"]), np.asarray(Image.open(io.BytesIO(data))))
        assert (row["prompt"], row["seed"], row["prompt_id"]) == (rec["prompt"], rec["seed"], rec["prompt_id"])
        assert row["id"] not in seen
        seen.add(row["id"])
    return seen
