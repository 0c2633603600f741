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

from ifbatch.configs.schema import STAGES, CascadeConfig

from ..inputs.prompts import Rejected
from ..storage import Location
from .spill import write_or_spill

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
    "webdataset",
)
SECRET = re.compile(r"(secret|token|password|passwd|credential|api_key|access_key)", re.I)

RUNS_DIR = "runs"  # run records, rejected rows, contact sheets


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
    path = loc.path(RUNS_DIR, f"{run_id}-rejected.parquet")
    loc.write_bytes(path, buf.getvalue())
    return loc.uri(path)


def write_run_record(loc: Location, run_id: str, record: dict[str, Any]) -> str:
    """Write runs/<run_id>.json; when the store stays down, spill it and raise StoreDown (outputs/spill.py)."""
    path = loc.path(RUNS_DIR, f"{run_id}.json")
    write_or_spill(loc, path, json.dumps(redact(record), indent=1, sort_keys=True, default=str).encode())
    return loc.uri(path)


def _same_work(record: dict[str, Any], cfg: CascadeConfig) -> bool:
    """Whether an earlier run's models and steps are this config's (so its timings are this run's costs)."""
    old = record.get("config") or {}
    keys = ("source", "revision", "dtype", "steps", "timesteps", "batch_size")
    now = cfg.model_dump(mode="json")
    choices = ("candidates_per_image", "min_clip_score")  # best of k: stage I's and the scorer's work per image
    defaults = type(cfg.data)().model_dump(mode="json")  # what a record from before best of k ran with
    same_choices = all((old.get("data") or {}).get(k, defaults[k]) == now["data"][k] for k in choices)
    return same_choices and all(
        {k: old.get(s, {}).get(k) for k in keys} == {k: now[s].get(k) for k in keys} for s in STAGES
    )


def measured_costs(loc: Location, cfg: CascadeConfig, lookback: int = 20) -> tuple[dict[str, float], str] | None:
    """Seconds per image per stage from the newest earlier run into this output that ran under a plan, with the
    same models, steps and batches, and made at least 4 images per GPU: its GPU-seconds per image (GPUs / its
    steady rate) split in the shares its stages' own timings had. None when no such run exists."""
    runs = loc.path(RUNS_DIR)
    if not loc.fs.exists(runs):
        return None
    records = [p for p in loc.fs.ls(runs, detail=False) if p.endswith(".json")]  # (not a glob: any path is literal)
    for path in sorted(records, reverse=True)[:lookback]:
        try:
            rec = json.loads(loc.fs.cat_file(path))
            plan, per = rec.get("plan") or {}, rec.get("stage_seconds_per_image") or {}
            rate, images = rec.get("steady_rows_per_second") or 0.0, (rec.get("counts") or {}).get("done", 0)
            if plan.get("mode") != "auto" or rate <= 0 or images < 4 * plan["gpus"] or not _same_work(rec, cfg):
                continue
            total = sum(per.get(s) or 0.0 for s in STAGES)
            if total <= 0:
                continue
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a record from an older ifbatch, or damaged: not a measurement
        gpu_seconds = plan["gpus"] / rate
        costs = {s: gpu_seconds * (per.get(s) or 0.0) / total for s in STAGES}
        return costs, f"run {rec.get('run_id')} into this output ({images} images on {plan['gpus']} GPUs)"
    return None
