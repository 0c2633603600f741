"""Prefect tasks: the I/O steps retry (they are idempotent); generation resumes instead of retrying blindly."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator

import pyarrow as pa
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ifbatch.configs import ConfigError
from ifbatch.configs.loader import override_keys
from ifbatch.models.cascade import resolve_cascade
from ifbatch.models.tiny import tiny_ready

from .artifacts import LiveProgress, artifact_key, contact_sheet, counts_table, summary_markdown
from .context import RunContext, RunStopped, RunSummary, StoppedRun
from .inputs.expand import image_count, without_done
from .inputs.prompts import PromptPlan, PromptTableError, read_prompts
from .outputs.compact import compact
from .outputs.images import IMAGES_DIR
from .outputs.loadable import write_image_metadata
from .outputs.manifest import MANIFEST_DIR, done_ids
from .outputs.records import RUNS_DIR, versions, write_rejected, write_run_record
from .outputs.shards import SHARDS_DIR, remove_orphan_shards
from .outputs.spill import StoreDown, unspill
from .preflight import OutputError, preflight
from .stream.interrupt import Interrupted
from .stream.pipeline import PipelineResult, run_pipeline
from .stream.placing import Calibration, placed
from .stream.plan import PlanError
from .stream.progress import Progress, listen
from .stream.ray_session import ray_session


def _transient(task, task_run, state) -> bool:
    """Retry a step only for what may pass (a store that hiccuped), not for what only the user can fix: a retry
    would fail the same way, and Prefect logs a traceback before each."""
    return not isinstance(state.data, USER_ERRORS)


USER_ERRORS = (PromptTableError, ConfigError, PlanError, OutputError)
RETRY = dict(retries=2, retry_delay_seconds=2, retry_condition_fn=_transient, cache_policy=NO_CACHE)


@task(name="preflight", retries=1, retry_delay_seconds=2, retry_condition_fn=_transient, cache_policy=NO_CACHE)
def preflight_check(ctx: RunContext) -> None:
    """Before Ray starts: the table's columns can be read and the output can be written (tasks/preflight.py)."""
    preflight(ctx.params["prompts"], ctx.output, ctx.cfg)


@task(name="read-prompts", **RETRY)
def read_prompt_table(ctx: RunContext) -> PromptPlan:
    prompts = ctx.params["prompts"]
    plan = read_prompts(prompts, ctx.cfg)
    get_run_logger().info(
        "read %d rows from %s: %d valid, %d rejected", plan.total, prompts, plan.rows.num_rows, len(plan.rejected)
    )
    return plan


@task(name="plan-resume", **RETRY)
def plan_resume(ctx: RunContext) -> tuple[pa.Table, int]:
    """Rows still to generate. --overwrite deletes earlier outputs first; otherwise rows already ok are skipped."""
    loc, rows, log = ctx.loc, ctx.plan.rows, get_run_logger()
    if ctx.params.get("overwrite"):
        for sub in (MANIFEST_DIR, IMAGES_DIR, SHARDS_DIR):
            if loc.fs.exists(loc.path(sub)):
                loc.fs.rm(loc.path(sub), recursive=True)
        log.info("--overwrite: removed earlier manifest, images and shards under %s", ctx.output)
        return rows, 0
    leftovers = loc.temp_files(IMAGES_DIR, MANIFEST_DIR, RUNS_DIR)  # from writes a full disk or a kill cut short
    for path in leftovers:
        loc.fs.rm_file(path)
    if leftovers:
        log.info("removed %d unfinished files earlier runs left (%s)", len(leftovers), ", ".join(leftovers[:3]))
    uploaded = unspill(loc)
    if uploaded:
        log.info("wrote %d records an earlier run kept locally while the store was down: %s", len(uploaded), uploaded)
    orphans = remove_orphan_shards(loc)
    if orphans:
        log.info(
            "removed %d shards no manifest record names (written by a run that ended before recording them; "
            "their images are made again): %s",
            len(orphans),
            ", ".join(orphans[:5]) + (" ..." if len(orphans) > 5 else ""),
        )
    done = done_ids(loc)
    if len(done) == 0:
        return rows, 0
    todo = without_done(rows, done)
    skipped = image_count(rows) - image_count(todo)
    log.info("resuming: %d images already in the manifest are skipped, %d to generate", skipped, image_count(todo))
    return todo, skipped


@task(name="generate", cache_policy=NO_CACHE)
def generate_rows(
    rows: pa.Table, ctx: RunContext, log_every_s: float = 10.0
) -> tuple[PipelineResult, dict[str, dict], float, dict]:
    """Check models, start or join Ray, plan and reserve the stages' placement, stream the rows through the stage
    actors. Returns result, models, start-up seconds, and the plan as the run record keeps it."""
    log = get_run_logger()
    t0 = time.monotonic()
    cfg = ctx.cfg
    if cfg.tiny is not None and not tiny_ready(cfg.tiny.dir, cfg.tiny.seed):
        log.info("building the tiny random-weight cascade in %s (first use; it loads like real weights)", cfg.tiny.dir)
    cfg, models = resolve_cascade(cfg)
    last = [0.0]

    def log_progress(p: Progress) -> None:
        if time.monotonic() - last[0] >= log_every_s or p.done + p.failed == p.total:
            last[0] = time.monotonic()
            log.info("progress: %s", p.line())

    images = image_count(rows)
    stops = [listen(log_progress), listen(LiveProgress(ctx.run_id, images))]
    try:
        explicit = override_keys(ctx.params.get("overrides") or [])
        with ray_session(cfg.ray), placed(cfg, explicit, images, ctx.loc) as placement:
            for line in placement.lines:
                log.info("%s", line)
            startup = time.monotonic() - t0
            calibration = Calibration.of(placement, cfg, explicit, images)
            try:
                for phase in _phases(rows, calibration, ctx.result):
                    result = run_pipeline(
                        phase,
                        placement.cfg,
                        ctx.loc,
                        ctx.output,
                        ctx.run_id,
                        models,
                        placement.groups,
                        result=ctx.result,
                        on_batch=calibration,
                        total=images,
                    )
                    for line in calibration.lines:
                        log.info("%s", line)
                    calibration.lines = []
            except Interrupted as e:  # the user stopped it: the flow records what was done, no error to show
                ctx.models, ctx.stage_plan, ctx.startup_seconds, ctx.interrupted = models, placement.record, startup, e
                return ctx.result, models, startup, placement.record
            except Exception as e:  # generation had started: the flow records what was done (RunStopped)
                ctx.models, ctx.stage_plan, ctx.startup_seconds = models, placement.record, startup
                raise RunStopped(placement.failed(e)) from e
    finally:
        for stop in stops:
            stop()
    return result, models, startup, placement.record


def _phases(rows: pa.Table, calibration: Calibration, result: PipelineResult) -> Iterator[pa.Table]:
    """The rows as one stream; or, when a plan of estimated costs splits the GPUs between stage groups, its first
    images as a phase of their own, then the plan corrected from their timings (Calibration), then the rest."""
    if not calibration.phased:
        yield rows
        return
    first = calibration.first_rows(rows)
    yield rows.slice(0, first)
    calibration.calibrate(result)
    if first < rows.num_rows:
        yield rows.slice(first)


def _run_facts(ctx: RunContext) -> dict:
    """What every run record says about its run: id, times, parameters, config, models, package versions."""
    return dict(
        run_id=ctx.run_id,
        started=ctx.started,
        finished=dt.datetime.now(dt.UTC).isoformat(),
        params=ctx.params,
        config=ctx.cfg.model_dump(mode="json"),
        gpu_slot=ctx.gpu_slot,
        models=ctx.models,
        versions=versions(),
    )


@task(name="write-run-record", **RETRY)
def write_records(ctx: RunContext) -> RunSummary:
    loc, result, plan = ctx.loc, ctx.result, ctx.plan
    if ctx.cfg.output.compact and len(result.parts) > 1:  # few large parts: what every resume and verify reads
        written, removed = compact(loc, ctx.run_id)
        if removed:
            result.parts = written
            get_run_logger().info("merged the run's %d manifest parts into %d", len(removed), len(written))
    if result.done:
        write_image_metadata(loc)  # images/metadata.parquet, for load_dataset("imagefolder")
    rejected_file = write_rejected(loc, ctx.run_id, plan.rejected)
    images = result.done + result.failed
    per_image = {k: v / images for k, v in result.stage_seconds.items()} if images else {}
    counts = dict(
        total=plan.total,
        images=image_count(plan.rows),
        done=result.done,
        failed=result.failed,
        rejected=len(plan.rejected),
        skipped=ctx.skipped,
    )
    seconds = ctx.seconds
    record = dict(
        **_run_facts(ctx),
        counts=counts,
        seconds=seconds,
        startup_seconds=ctx.startup_seconds,
        rows_per_second=result.done / result.seconds if result.seconds else 0.0,
        steady_rows_per_second=result.steady_rows_per_second,
        plan=ctx.stage_plan,
        stage_seconds_per_image=per_image,
        manifest_parts=result.parts,
        rejected_file=rejected_file,
        errors=result.errors,
    )
    uri = write_run_record(loc, ctx.run_id, record)
    return RunSummary(
        run_id=ctx.run_id,
        output=ctx.output,
        seconds=seconds,
        startup_seconds=ctx.startup_seconds,
        rows_per_second=record["rows_per_second"],
        steady_rows_per_second=record["steady_rows_per_second"],
        plan=ctx.stage_plan,
        stage_seconds_per_image=per_image,
        run_record=uri,
        rejected_file=rejected_file,
        errors=result.errors,
        **counts,
    )


@task(name="write-stopped-record", cache_policy=NO_CACHE)
def write_stopped_record(ctx: RunContext, stopped: RunStopped, status: str = "stopped") -> StoppedRun:
    """The run record of a run that stopped mid-way (or was cancelled): what was done, and why it stopped; spilled
    when the store is still down (the next run writes it)."""
    result, images = ctx.result, image_count(ctx.plan.rows) if ctx.plan else 0
    reason = f"{type(stopped.cause).__name__}: {stopped.cause}"
    interrupted = isinstance(stopped.cause, Interrupted)
    if interrupted:
        reason, status = str(stopped.cause), "interrupted"
    record = dict(
        **_run_facts(ctx),
        status=status,
        reason=reason,
        counts=dict(images=images, done=result.done, failed=result.failed, skipped=ctx.skipped),
        seconds=ctx.seconds,
        plan=ctx.stage_plan,
        manifest_parts=result.parts,
        errors=result.errors,
    )
    try:
        where = write_run_record(ctx.loc, ctx.run_id, record)
    except StoreDown as e:
        where = str(e.spilled)
    code = stopped.cause.exit_code if interrupted else 1
    return StoppedRun(
        ctx.run_id, ctx.output, result.done, result.failed, images, reason, where, status, code, ctx.skipped
    )


@task(name="publish-artifacts", **RETRY)
def publish_artifacts(summary: RunSummary, ctx: RunContext) -> str | None:
    """The counts table, the markdown summary, and the contact sheet it links to."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    loc = ctx.loc
    sheet = contact_sheet(loc, summary.run_id)
    create_table_artifact(
        key=artifact_key(summary.run_id, "counts"),
        table=counts_table(summary),
        description=f"ifbatch run {summary.run_id}: counts and per-stage time",
    )
    sample = ctx.plan.rows.slice(0, 5).select(["id", "prompt"]).to_pylist()
    md = summary_markdown(
        summary, ctx.cfg.preset, ctx.models, ctx.params["prompts"], loc.uri(loc.path(MANIFEST_DIR)), sheet, sample
    )
    create_markdown_artifact(
        key=artifact_key(summary.run_id, "summary"), markdown=md, description=f"ifbatch run {summary.run_id}: summary"
    )
    return sheet
