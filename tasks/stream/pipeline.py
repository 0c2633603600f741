"""The Ray Data pipeline: rows -> text encoder -> stage I -> stage II -> stage III -> writer, streamed, with
manifest parts.

Each stage is an actor pool (one loaded model per actor, `num_gpus`/`num_cpus`/`replicas`/`batch_size` from
the config); Ray Data restarts dead actors and retries their batches (the stage calls are idempotent). Only
manifest records (Arrow, no pixels) come back to the driver, which writes a manifest part once
`output.manifest_part_rows` records are in hand or `output.manifest_flush_seconds` have passed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from ifbatch.configs.schema import STAGES, CascadeConfig

from ..outputs.manifest import write_part
from ..storage import Location
from .progress import Progress, report
from .stages import STAGE_ACTORS
from .writer import ImageWriter


@dataclass
class PipelineResult:
    done: int = 0
    failed: int = 0
    parts: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)  # summed per-row seconds
    errors: list[dict] = field(default_factory=list)  # first few failed rows: id and error

    def add(self, records: pa.Table) -> None:
        ok = pc.equal(records.column("status"), "ok")
        done = pc.sum(ok).as_py() or 0
        self.done += done
        self.failed += records.num_rows - done
        if len(self.errors) < 20 and done < records.num_rows:
            failed = records.filter(pc.invert(ok)).select(["id", "error"]).slice(0, 20 - len(self.errors))
            self.errors += failed.to_pylist()
        for stage in (*STAGES, "write"):
            s = pc.sum(records.column(f"seconds_{stage}")).as_py()
            if s is not None:
                self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + s


def build_dataset(rows: pa.Table, cfg: CascadeConfig, output: str):
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # Small input blocks: a task takes whole blocks, so the smallest stage batch sets how finely rows stream.
    step = min(getattr(cfg, stage).batch_size for stage in STAGES)
    ds = ray.data.from_arrow([rows.slice(i, step) for i in range(0, rows.num_rows, step)])
    for stage in STAGES:
        sc = getattr(cfg, stage)
        ds = ds.map_batches(
            STAGE_ACTORS[stage],
            fn_constructor_kwargs={"cfg": cfg},
            batch_size=sc.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=sc.replicas),
            num_gpus=sc.num_gpus,
            num_cpus=sc.num_cpus,
        )
    return ds.map_batches(
        ImageWriter,
        fn_constructor_kwargs=dict(cfg=cfg, output=output),
        batch_size=cfg.stage_3.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.25,
    )


def run_pipeline(
    rows: pa.Table, cfg: CascadeConfig, loc: Location, output: str, run_id: str, models: dict
) -> PipelineResult:
    """Generate every row of `rows` (already validated, resume-filtered) and write manifest parts."""
    result = PipelineResult()
    if rows.num_rows == 0:
        return result
    t0 = time.monotonic()
    models_json = json.dumps(models, sort_keys=True)
    pending: list[pa.Table] = []
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal last_flush
        if pending:
            table = pa.concat_tables(pending)
            result.parts.append(write_part(loc, table, run_id, models_json, len(result.parts)))
            pending.clear()
        last_flush = time.monotonic()

    for records in build_dataset(rows, cfg, output).iter_batches(batch_size=None, batch_format="pyarrow"):
        pending.append(records)
        result.add(records)
        if (
            sum(t.num_rows for t in pending) >= cfg.output.manifest_part_rows
            or time.monotonic() - last_flush >= cfg.output.manifest_flush_seconds
        ):
            flush()
        report(Progress(result.done, result.failed, rows.num_rows, t0))
    flush()
    result.seconds = time.monotonic() - t0
    return result
