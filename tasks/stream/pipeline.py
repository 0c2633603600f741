"""The Ray Data pipeline: rows -> encode -> stage I -> stage II -> stage III -> writer, streamed, with manifest parts.

Each stage is an actor pool (one loaded model per actor, `num_gpus`/`num_cpus`/`replicas`/`batch_size` from
the config); Ray Data restarts dead actors and retries their batches (the stage calls are idempotent). Only manifest records (no pixels) come back to the driver, which writes a manifest part once
`output.manifest_part_rows` records are in hand or `output.manifest_flush_seconds` have passed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import pyarrow as pa

from ifbatch.configs.schema import CascadeConfig
from ifbatch.models import encode, safety
from ifbatch.models.cascade import prepare
from ifbatch.models.loading import Resolved, resolve

from .manifest import write_part
from .progress import Progress, report
from .stages import STAGES
from .storage import Location
from .writer import ImageWriter

PROBES = {"text_encoder": encode.PROBE_FILE, "stage_1": "model_index.json", "stage_2": "model_index.json",
          "stage_3": "model_index.json"}


@dataclass
class PipelineResult:
    done: int = 0
    failed: int = 0
    parts: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)  # summed per-row seconds
    errors: list[dict] = field(default_factory=list)  # first few failed rows: id and error


def resolve_models(cfg: CascadeConfig) -> tuple[CascadeConfig, dict[str, dict]]:
    """Build generated weights if asked, check every model source, pin hub commits so all replicas agree."""
    prepare(cfg)
    pinned, record = {}, {}
    for role, probe in PROBES.items():
        sc = getattr(cfg, role)
        r: Resolved = resolve(role, sc.source, sc.revision, sc.variant, sc.dtype, probe_file=probe)
        record[role] = r.record()
        if r.commit:
            pinned[role] = sc.model_copy(update={"revision": r.commit})
    if cfg.safety.checker or cfg.safety.watermark:
        r = resolve("safety", cfg.safety_source, cfg.safety.revision, None, cfg.stage_3.dtype,
                    probe_file=safety.probe_file(cfg.safety))
        record["safety"] = r.record()
        if r.commit:
            pinned["safety"] = cfg.safety.model_copy(update={"revision": r.commit})
    return cfg.model_copy(update=pinned), record


def build_dataset(rows: pa.Table, cfg: CascadeConfig, output: str, run_id: str, models: str):
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # Small input blocks: a task takes whole blocks, so the smallest stage batch sets how finely rows stream.
    step = min(getattr(cfg, role).batch_size for role in STAGES)
    ds = ray.data.from_arrow([rows.slice(i, step) for i in range(0, rows.num_rows, step)])
    for role, stage in STAGES.items():
        sc = getattr(cfg, role)
        ds = ds.map_batches(stage, fn_constructor_kwargs={"cfg": cfg}, batch_size=sc.batch_size,
                            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=sc.replicas),
                            num_gpus=sc.num_gpus, num_cpus=sc.num_cpus)
    return ds.map_batches(ImageWriter, fn_constructor_kwargs=dict(cfg=cfg, output=output, run_id=run_id,
                                                                  models=models),
                          batch_size=cfg.stage_3.batch_size, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.25)


def run_pipeline(rows: pa.Table, cfg: CascadeConfig, loc: Location, output: str, run_id: str,
                 models: dict) -> PipelineResult:
    """Generate every row of `rows` (already validated, resume-filtered) and write manifest parts."""
    result = PipelineResult()
    if rows.num_rows == 0:
        return result
    t0 = time.monotonic()
    ds = build_dataset(rows, cfg, output, run_id, json.dumps(models, sort_keys=True))
    pending: list[dict] = []
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal last_flush
        if pending:
            result.parts.append(write_part(loc, pending, run_id, len(result.parts)))
            pending.clear()
        last_flush = time.monotonic()

    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for raw in batch["record"]:
            rec = json.loads(raw)
            pending.append(rec)
            if rec["status"] == "ok":
                result.done += 1
            else:
                result.failed += 1
                if len(result.errors) < 20:
                    result.errors.append({"id": rec["id"], "error": rec["error"]})
            for s in ("encode", "stage_1", "stage_2", "stage_3", "write"):
                v = rec.get(f"seconds_{s}")
                if v is not None:
                    result.stage_seconds[s] = result.stage_seconds.get(s, 0.0) + v
        if len(pending) >= cfg.output.manifest_part_rows or \
                time.monotonic() - last_flush >= cfg.output.manifest_flush_seconds:
            flush()
        report(Progress(result.done, result.failed, rows.num_rows, t0))
    flush()
    result.seconds = time.monotonic() - t0
    return result
