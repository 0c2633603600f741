"""Prefect tasks: the I/O steps retry (they are idempotent); generation resumes instead of retrying blindly."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ifbatch.configs.schema import CascadeConfig
from ifbatch.models.tiny import tiny_ready

from .artifacts import LiveProgress, contact_sheet, counts_table, summary_markdown
from .manifest import MANIFEST_DIR, done_ids
from .pipeline import PipelineResult, resolve_models, run_pipeline
from .progress import Progress, listen
from .prompts import PromptPlan, read_prompts
from .ray_session import ray_session
from .records import versions, write_rejected, write_run_record
from .storage import locate


@dataclass
class RunSummary:
    run_id: str
    output: str
    total: int
    done: int
    failed: int
    rejected: int
    skipped: int
    seconds: float
    startup_seconds: float
    rows_per_second: float
    stage_seconds_per_image: dict[str, float]
    run_record: str
    rejected_file: str | None
    errors: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.rejected == 0


def new_run_id() -> str:
    import secrets

    return f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


@task(name="read-prompts", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def read_prompt_table(prompts: str, cfg: CascadeConfig) -> PromptPlan:
    plan = read_prompts(prompts, cfg)
    get_run_logger().info("read %d rows from %s: %d valid, %d rejected", plan.total, prompts, plan.rows.num_rows,
                          len(plan.rejected))
    return plan


@task(name="plan-resume", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def plan_resume(plan: PromptPlan, output: str, cfg: CascadeConfig, overwrite: bool) -> tuple[pa.Table, int]:
    """Rows still to generate. --overwrite deletes earlier outputs first; otherwise rows already ok are skipped."""
    loc = locate(output, cfg.s3)
    log = get_run_logger()
    if overwrite:
        for sub in (MANIFEST_DIR, "images"):
            if loc.fs.exists(loc.path(sub)):
                loc.fs.rm(loc.path(sub), recursive=True)
        log.info("--overwrite: removed earlier manifest and images under %s", output)
        return plan.rows, 0
    done = done_ids(loc)
    if not done:
        return plan.rows, 0
    keep = pc.invert(pc.is_in(plan.rows.column("id"), value_set=pa.array(sorted(done), pa.string())))
    todo = plan.rows.filter(keep)
    skipped = plan.rows.num_rows - todo.num_rows
    log.info("resuming: %d rows already in the manifest are skipped, %d to generate", skipped, todo.num_rows)
    return todo, skipped


@task(name="generate", cache_policy=NO_CACHE)
def generate_rows(rows: pa.Table, cfg: CascadeConfig, output: str, run_id: str,
                  log_every_s: float = 10.0) -> tuple[PipelineResult, dict, float]:
    """Check models, start or join Ray, stream the rows through the stage actors. Returns result, models, start-up s."""
    log = get_run_logger()
    t0 = time.monotonic()
    if cfg.tiny is not None and not tiny_ready(cfg.tiny.dir, cfg.tiny.seed):
        log.info("building the tiny random-weight cascade in %s (first use; it loads like real weights)",
                 cfg.tiny.dir)
    cfg, models = resolve_models(cfg)
    last = [0.0]

    def log_progress(p: Progress) -> None:
        if time.monotonic() - last[0] >= log_every_s or p.done + p.failed == p.total:
            last[0] = time.monotonic()
            log.info("progress: %s", p.line())

    stops = [listen(log_progress), listen(LiveProgress(run_id, rows.num_rows))]
    try:
        with ray_session(cfg.ray):
            startup = time.monotonic() - t0
            result = run_pipeline(rows, cfg, locate(output, cfg.s3), output, run_id, models)
    finally:
        for stop in stops:
            stop()
    return result, models, startup


@task(name="write-run-record", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def write_records(cfg: CascadeConfig, params: dict[str, Any], plan: PromptPlan, skipped: int,
                  result: PipelineResult, models: dict, run_id: str, started: str, seconds: float,
                  startup: float) -> RunSummary:
    loc = locate(params["output"], cfg.s3)
    rejected_file = write_rejected(loc, run_id, plan.rejected)
    images = result.done + result.failed
    per_image = {k: v / images for k, v in result.stage_seconds.items()} if images else {}
    counts = dict(total=plan.total, done=result.done, failed=result.failed, rejected=len(plan.rejected),
                  skipped=skipped)
    record = dict(run_id=run_id, started=started, finished=dt.datetime.now(dt.timezone.utc).isoformat(),
                  params=params, config=cfg.model_dump(mode="json"), models=models, versions=versions(),
                  counts=counts, seconds=seconds, startup_seconds=startup,
                  rows_per_second=result.done / result.seconds if result.seconds else 0.0,
                  stage_seconds_per_image=per_image, manifest_parts=result.parts, rejected_file=rejected_file,
                  errors=result.errors)
    uri = write_run_record(loc, run_id, record)
    return RunSummary(run_id=run_id, output=params["output"], seconds=seconds, startup_seconds=startup,
                      rows_per_second=record["rows_per_second"], stage_seconds_per_image=per_image, run_record=uri,
                      rejected_file=rejected_file, errors=result.errors, **counts)


@task(name="publish-artifacts", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def publish_artifacts(summary: RunSummary, cfg: CascadeConfig, models: dict, prompts: str,
                      plan: PromptPlan) -> str | None:
    """The counts table, the markdown summary, and the contact sheet it links to."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from .artifacts import artifact_key

    loc = locate(summary.output, cfg.s3)
    sheet = contact_sheet(loc, summary.run_id)
    create_table_artifact(key=artifact_key(summary.run_id, "counts"), table=counts_table(summary),
                          description=f"ifbatch run {summary.run_id}: counts and per-stage time")
    sample = plan.rows.slice(0, 5).select(["id", "prompt"]).to_pylist()
    md = summary_markdown(summary, cfg.preset, models, prompts, loc.uri(loc.path(MANIFEST_DIR)), sheet, sample)
    create_markdown_artifact(key=artifact_key(summary.run_id, "summary"), markdown=md,
                             description=f"ifbatch run {summary.run_id}: summary")
    return sheet
