"""One run, with no Prefect in it: preflight -> (GPU slot, lease) -> read the table -> resume -> generate -> finish,
or stop. It returns the run's summary (RunSummary) or raises RunEnded with what a stopped or interrupted run kept
(StoppedRun); either way the run record is written. The Prefect flow (flows/generate.py) and the tests call it; what
runs the stream is an executor (stream/executors.py): Ray by default, or this process (`executor=local`).

Callers shape it without changing it: `step` runs each step (the flow makes each a Prefect task, retried where the
step is idempotent); `slot` is held around the lease (the flow's GPU concurrency slot); `cancels` are the
exceptions that mean "cancelled from outside" (Prefect's TerminationSignal): the run records what it did and
re-raises them; `listeners` make, from the run's id and image count, a listener of every progress update (the
flow's progress artifact).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from ifbatch.configs import ConfigError
from ifbatch.configs.loader import override_keys
from ifbatch.configs.schema import CascadeConfig
from ifbatch.models.cascade import resolve_cascade
from ifbatch.models.loading import ModelLoadError
from ifbatch.models.tiny import tiny_ready

from .context import Cancelled, RunContext, RunParams, RunStopped, RunSummary, StoppedRun
from .inputs.expand import image_count, without_done
from .inputs.prompts import PromptPlan, PromptTableError, read_prompts
from .outputs.adopt import mark_closed, mark_open, open_runs, take_over
from .outputs.compact import compact
from .outputs.drift import SettingsChanged, drift
from .outputs.formats import FORMATS
from .outputs.images import IMAGES_DIR
from .outputs.lease import Lease, LeaseHeld
from .outputs.loadable import write_image_metadata
from .outputs.manifest import MANIFEST_DIR
from .outputs.records import RUNS_DIR, versions, write_rejected, write_run_record
from .outputs.shards import SHARDS_DIR
from .outputs.spill import StoreDown, unspill
from .preflight import OutputError
from .preflight import preflight as check_table_and_output
from .storage import storage_errors
from .stream.cluster import ClusterChanged
from .stream.executors import executor_for
from .stream.interrupt import Interrupted
from .stream.pipeline import run_pipeline
from .stream.plan import PlanError
from .stream.progress import Progress, listen
from .stream.ray_session import ClusterUnreachable, address_origin, join_address, reach

T = TypeVar("T")

# What only the user can fix: a step that raises one is not retried (it would fail the same way).
USER_ERRORS: tuple[type[BaseException], ...] = (
    PromptTableError, ConfigError, PlanError, OutputError, SettingsChanged, ClusterUnreachable,
)  # fmt: skip


def operator_errors() -> tuple[type[BaseException], ...]:
    """Failures an operator can act on from the message alone: reported as one line (no traceback)."""
    return (*USER_ERRORS, ModelLoadError, ClusterChanged, LeaseHeld, *storage_errors())


TRACEBACK_CHARS = 20_000  # of a stopped run's cause in its run record: the end (where it was raised) is kept


def cause_traceback(stopped: RunStopped) -> str:
    """The whole chain of what stopped a run (the stream's error and what caused it), as Python prints it."""
    text = "".join(traceback.format_exception(stopped))
    return text if len(text) <= TRACEBACK_CHARS else "...\n" + text[-TRACEBACK_CHARS:]


class RunEnded(Exception):
    """A run that stopped after generation started, or was interrupted: what it kept (`run`), its record written."""

    def __init__(self, run: StoppedRun):
        super().__init__(run.line)
        self.run = run


def preflight(prompts: str, output: str, cfg: CascadeConfig) -> None:
    """Before anything starts: the cluster to join answers (bounded: stream/ray_session.reach), the table's columns
    can be read and the output written (tasks/preflight.py)."""
    if cfg.executor == "ray" and join_address(cfg.ray):
        reach(join_address(cfg.ray), address_origin(cfg.ray))
    check_table_and_output(prompts, output, cfg)


def plain_step(name: str, fn: Callable[[], T], retries: int) -> T:
    """Run a step as it is (no retries: a plain run's caller reruns; Prefect's flow retries I/O steps)."""
    return fn()


class Run:
    """params: the run's parameters as given (RunParams, or a mapping of its fields; recorded); cfg: the resolved
    config."""

    def __init__(
        self,
        params: RunParams | dict[str, Any],
        cfg: CascadeConfig,
        *,
        log: logging.Logger | logging.LoggerAdapter | None = None,
        step: Callable[[str, Callable[[], Any], int], Any] = plain_step,
        slot: Callable[[RunContext], contextlib.AbstractContextManager] | None = None,
        cancels: tuple[type[BaseException], ...] = (),
        listeners: Iterable[Callable[[str, int], Callable[[Progress], None]]] = (),
        executor=None,
        log_every_s: float = 10.0,
    ):
        self.ctx = RunContext(RunParams.of(params), cfg)
        self.log = log or logging.getLogger("ifbatch.run")
        self.step = step
        self.slot = slot or (lambda ctx: contextlib.nullcontext())
        self.cancels = cancels
        self.listeners = list(listeners)
        self.executor = executor or executor_for(cfg.executor)
        self.log_every_s = log_every_s

    def __call__(self) -> RunSummary:
        ctx, log = self.ctx, self.log
        log.info("run %s: preset %s, %s -> %s", ctx.run_id, ctx.cfg.preset, ctx.params.prompts, ctx.output)
        self.step("preflight", self.preflight, 1)
        with (
            self.slot(ctx) as ctx.gpu_slot,  # the flow's: runs that share the GPUs queue
            Lease(ctx.loc, ctx.run_id).held(wait=ctx.params.wait, log=log.info),  # one run per output
        ):
            ctx.plan = self.step("read-prompts", self.read, 2)
            rows, ctx.skipped = self.step("plan-resume", self.resume, 2)
            try:
                self.step("generate", lambda: self.generate(rows), 0)
                if ctx.interrupted is not None:
                    raise RunStopped(ctx.interrupted)
            except RunStopped as e:
                stop = e
                raise RunEnded(self.step("write-stopped-record", lambda: self.stopped(stop), 0)) from e
            except self.cancels:  # cancelled from outside (Prefect) before or after the stream: record what was done
                self.record_cancel()
                raise
            return self.step("write-run-record", self.finish, 2)

    # -- the steps ------------------------------------------------------------------------------------------------

    def preflight(self) -> None:
        """Before any model or cluster: the table's columns can be read and the output can be written."""
        preflight(self.ctx.params.prompts, self.ctx.output, self.ctx.cfg)

    def read(self) -> PromptPlan:
        prompts = self.ctx.params.prompts
        plan = read_prompts(prompts, self.ctx.cfg)
        self.log.info(
            "read %d rows from %s: %d valid, %d rejected", plan.total, prompts, plan.rows.num_rows, len(plan.rejected)
        )
        return plan

    def resume(self) -> tuple[pa.Table, int]:
        """Rows still to generate. overwrite deletes earlier outputs first; otherwise rows already ok are skipped."""
        ctx, log = self.ctx, self.log
        loc, rows = ctx.loc, ctx.plan.rows
        if ctx.params.overwrite:
            for sub in (MANIFEST_DIR, *(fmt.folder for fmt in FORMATS.values())):
                if loc.fs.exists(loc.path(sub)):
                    loc.fs.rm(loc.path(sub), recursive=True)
            for run in open_runs(loc, but=ctx.run_id):  # nothing of theirs is left to take over
                mark_closed(loc, run)
            log.info("--overwrite: removed earlier manifest, images and shards under %s", ctx.output)
            return rows, 0
        # from writes a full disk or a kill cut short
        leftovers = loc.temp_files(IMAGES_DIR, SHARDS_DIR, MANIFEST_DIR, RUNS_DIR)
        for path in leftovers:
            loc.fs.rm_file(path)
        if leftovers:
            log.info("removed %d unfinished files earlier runs left (%s)", len(leftovers), ", ".join(leftovers[:3]))
        uploaded = unspill(loc)
        if uploaded:
            log.info("wrote %d records an earlier run kept while the store was down: %s", len(uploaded), uploaded)
        self.take_over(rows)
        for fmt in FORMATS.values():
            orphans = fmt.tidy(loc)  # what a reader would otherwise see twice once the run makes it again
            if orphans:
                log.info(
                    "removed %d %s no manifest record names (written by a run that ended before recording them; "
                    "their images are made again): %s",
                    len(orphans),
                    fmt.folder,
                    ", ".join(orphans[:5]) + (" ..." if len(orphans) > 5 else ""),
                )
        found = drift(loc, rows, ctx.cfg)
        done = found.done
        if len(done) == 0:
            return rows, 0
        if found.changes:
            files = ctx.cfg.output.format == "files"
            if ctx.cfg.data.on_changed_settings == "refuse" or not files:
                raise found.refusal(ctx.output, files)
            log.warning(
                "remaking %d images made with other settings (data.on_changed_settings=remake): %s",
                len(found.ids),
                found.summary(),
            )
            ctx.changed = found.record()
            done = pc.filter(done, pc.invert(pc.is_in(done, found.ids)))
        todo = without_done(rows, done)
        skipped = image_count(rows) - image_count(todo) - ctx.adopted
        log.info("resuming: %d images already in the manifest are skipped, %d to generate", skipped, image_count(todo))
        return todo, skipped

    def take_over(self, rows: pa.Table) -> None:
        """After a run that ended before recording every image it wrote (its mark is left on the output): record
        the whole images it left that this run would make exactly so, and make only the rest (outputs/adopt.py)."""
        ctx, log = self.ctx, self.log
        unclean = open_runs(ctx.loc, but=ctx.run_id)
        if not unclean:
            return
        adopted = take_over(ctx.loc, rows, ctx.cfg, ctx.run_id)
        ctx.adopted = adopted.images
        log.info(
            "run %s ended before recording every image it wrote: %d whole images it left are taken over, not made "
            "again%s",
            ", ".join(unclean),
            adopted.images,
            f"; {len(adopted.left)} unrecorded files or shards are not (made again): {adopted.left[0].uri}: "
            f"{adopted.left[0].why}"
            if adopted.left
            else "",
        )
        if adopted.others:  # whole images another table's rerun will take over: the marks stay for it
            log.info("%d unrecorded files or shards hold images of another table: left for its rerun", adopted.others)
            return
        for run in unclean:  # every image they left is recorded now, or will be made again
            mark_closed(ctx.loc, run)

    def generate(self, rows: pa.Table) -> None:
        """Check the models, open the executor (Ray: start or join the cluster, plan and reserve the placement),
        stream the rows through the stages. Fills ctx.result as records come; a stream that fails after it started
        raises RunStopped (what was done is recorded); a Ctrl-C / SIGTERM on a terminal sets ctx.interrupted."""
        ctx, log, t0 = self.ctx, self.log, time.monotonic()
        cfg = ctx.cfg
        if cfg.tiny is not None and not tiny_ready(cfg.tiny.dir, cfg.tiny.seed):
            log.info(
                "building the tiny random-weight cascade in %s (first use; it loads like real weights)",
                cfg.tiny.dir,
            )
        cfg, ctx.models = resolve_cascade(cfg)
        images = image_count(rows)
        last = [0.0]

        def log_progress(p: Progress) -> None:
            if time.monotonic() - last[0] >= self.log_every_s or p.done + p.failed == p.total:
                last[0] = time.monotonic()
                log.info("progress: %s", p.line())

        stops = [listen(log_progress), *(listen(make(ctx.run_id, images)) for make in self.listeners)]
        try:
            explicit = override_keys(list(ctx.params.overrides))
            with self.executor.open(cfg, explicit, images, ctx.loc) as session:
                for line in session.lines:
                    log.info("%s", line)
                ctx.startup_seconds, ctx.stage_plan = time.monotonic() - t0, session.record
                mark_open(ctx.loc, ctx.run_id)  # until every image it writes is recorded (outputs/adopt.py)
                stream = lambda phase, stop: session.records(phase, ctx.output, ctx.run_id, ctx.models, stop)  # noqa: E731

                def on_batch(result) -> None:  # what the session has to say (a re-plan) is said when it happens
                    session.on_batch(result)
                    for line in session.said():
                        log.info("%s", line)

                try:
                    for phase in session.phases(rows, ctx.result):
                        run_pipeline(
                            phase, session.cfg, ctx.loc, ctx.run_id, ctx.models, stream,
                            result=ctx.result, on_batch=on_batch, total=images, in_process=session.in_process,
                            settler=session,
                        )  # fmt: skip
                        for line in session.said():  # (a re-plan between phases)
                            log.info("%s", line)
                except Interrupted as e:  # the user stopped it: what was done is recorded, no error to show
                    ctx.interrupted = e
                    ctx.settled = e.settled
                    if e.late:
                        log.info(
                            "recorded %d images written before the stop whose records had not come (read back from "
                            "the images)",
                            e.late,
                        )
                except self.cancels:  # recorded now, before the session's teardown (a cluster going away can
                    self.record_cancel()  # hang it past the 30 s Prefect gives a cancelled run before SIGKILL)
                    raise
                except Exception as e:  # generation had started: record what was done (RunStopped)
                    raise RunStopped(session.failed(e)) from e
                else:
                    ctx.settled = True  # the stream ended: every image it wrote came with its record
                finally:
                    ctx.stage_plan = session.record  # a re-plan from the first images replaced it
        finally:
            for stop in stops:
                stop()

    def _facts(self) -> dict:
        """What every run record says about its run: id, times, parameters, config, models, package versions."""
        ctx = self.ctx
        return dict(
            run_id=ctx.run_id,
            started=ctx.started,
            finished=dt.datetime.now(dt.UTC).isoformat(),
            params=ctx.params.record(),
            config=ctx.cfg.model_dump(mode="json"),
            gpu_slot=ctx.gpu_slot,
            models=ctx.models,
            changed_settings=ctx.changed,
            versions=versions(),
        )

    def finish(self) -> RunSummary:
        """Compact the run's manifest parts, write images/metadata.parquet, the rejected rows and the run record."""
        ctx = self.ctx
        loc, result, plan = ctx.loc, ctx.result, ctx.plan
        if ctx.cfg.output.compact and len(result.parts) > 1:  # few large parts: what every resume and verify reads
            written, removed = compact(loc, ctx.run_id)
            if removed:
                result.parts = written
                self.log.info("merged the run's %d manifest parts into %d", len(removed), len(written))
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
            adopted=ctx.adopted,
            filtered=result.filtered,
        )
        seconds = ctx.seconds
        record = dict(
            **self._facts(),
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
        if ctx.settled:
            mark_closed(loc, ctx.run_id)
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

    def record_cancel(self) -> None:
        """The run record of a run cancelled from outside, written once (the stream's records are in the manifest:
        run_pipeline flushed them on its way out)."""
        if self.ctx.cancelled is None:
            self.ctx.cancelled = self.stopped(RunStopped(Cancelled()), "cancelled")
            self.log.warning("cancelled: %s", self.ctx.cancelled.line)

    def stopped(self, stopped: RunStopped, status: str = "stopped") -> StoppedRun:
        """The run record of a run that stopped mid-way (or was cancelled, or interrupted): what was done, and why
        it stopped; spilled when the store is still down (the next run writes it)."""
        ctx = self.ctx
        result, images = ctx.result, image_count(ctx.plan.rows) if ctx.plan else 0
        reason = f"{type(stopped.cause).__name__}: {stopped.cause}"
        interrupted = isinstance(stopped.cause, Interrupted)
        if interrupted:
            reason, status = str(stopped.cause), "interrupted"
        record = dict(
            **self._facts(),
            status=status,
            reason=reason,
            counts=dict(
                images=images,
                done=result.done,
                failed=result.failed,
                skipped=ctx.skipped,
                adopted=ctx.adopted,
                filtered=result.filtered,
            ),
            seconds=ctx.seconds,
            plan=ctx.stage_plan,
            manifest_parts=result.parts,
            errors=result.errors,
        )
        if not interrupted and not isinstance(stopped.cause, Cancelled):
            record["traceback"] = cause_traceback(stopped)  # the terminal shows one line; the whole cause is here
        try:
            where = write_run_record(ctx.loc, ctx.run_id, record)
            if ctx.settled:  # (else the next run looks for what it left unrecorded)
                mark_closed(ctx.loc, ctx.run_id)
        except StoreDown as e:
            where = str(e.spilled)
        code = stopped.cause.exit_code if interrupted else 1
        return StoppedRun(
            ctx.run_id,
            ctx.output,
            result.done,
            result.failed,
            images,
            reason,
            where,
            status,
            code,
            ctx.skipped,
            ctx.adopted,
            ctx.settled,
        )
