"""One run, with no Prefect in it: preflight -> (GPU slot, lease) -> read the table -> resume -> generate -> finish,
or stop. Each step takes what it needs and returns what it made; the run returns its RunRecord (run_record.py),
written as the run record, whether it finished, stopped or was interrupted. The Prefect flow (flows/generate.py)
and the tests call it; what runs the stream is an executor (stream/executors.py): Ray by default, or this
process (`executor=local`).

Callers shape it without changing it: `step` runs each step (the flow makes each a Prefect task, retried where the
step is idempotent); `slot` is held around the lease (the flow's GPU concurrency slot); `cancels` are the
exceptions that mean "cancelled from outside" (Prefect's TerminationSignal): the run records what it did and
re-raises them; `listeners` make, from the run's id and image count, a listener of every progress update (the
flow's progress artifact).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from ifbatch.configs import ConfigError
from ifbatch.configs.loader import override_keys
from ifbatch.configs.schema import CascadeConfig
from ifbatch.models.cascade import resolve_cascade
from ifbatch.models.loading import ModelLoadError
from ifbatch.models.tiny import tiny_ready

from .inputs.expand import image_count, without_done
from .inputs.prompts import PromptPlan, PromptTableError, read_prompts
from .outputs import credentials
from .outputs.adopt import BEHIND, OPEN, Adopted, mark_closed, mark_open, open_runs, take_over
from .outputs.compact import compact
from .outputs.drift import SettingsChanged, drift
from .outputs.formats import FORMATS
from .outputs.images import IMAGES_DIR
from .outputs.lease import Lease, LeaseHeld
from .outputs.manifest import MANIFEST_DIR, read_manifest
from .outputs.records import RUNS_DIR, versions, write_rejected, write_run_record
from .outputs.shards import SHARDS_DIR
from .outputs.spill import StoreDown, unspill
from .preflight import OutputError
from .preflight import preflight as check_table_and_output
from .run_record import Cancelled, Counts, RunParams, RunRecord, RunStopped, new_run_id
from .storage import locate, storage_errors
from .stream.executors import executor_for
from .stream.interrupt import Interrupted
from .stream.pipeline import PipelineResult, Settler, run_pipeline
from .stream.plan import PlanError
from .stream.progress import Progress, listen
from .stream.ray.cluster import ClusterChanged
from .stream.ray.session import ClusterUnreachable, address_origin, join_address, reach

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


def preflight(prompts: str, output: str, cfg: CascadeConfig) -> None:
    """Before anything starts: the cluster to join answers (bounded: stream/ray/session.reach), the table's columns
    can be read and the output written (tasks/preflight.py)."""
    FORMATS.of(cfg)  # output.format names a format
    credentials.ready(cfg)  # a run asked to sign has a signer that signs
    if cfg.executor == "ray" and join_address(cfg.ray):
        reach(join_address(cfg.ray), address_origin(cfg.ray))
    check_table_and_output(prompts, output, cfg)


def plain_step(name: str, fn: Callable[[], T], retries: int) -> T:
    """Run a step as it is (no retries: a plain run's caller reruns; Prefect's flow retries I/O steps)."""
    return fn()


@dataclass(frozen=True)
class Resumed:
    """What resume found: the rows still to make, and what earlier runs had made."""

    todo: pa.Table
    skipped: int = 0  # images already in the manifest
    adopted: int = 0  # whole images an earlier run left unrecorded, recorded by this one (outputs/adopt.py)
    changed: dict | None = None  # done images remade for their other settings (outputs/drift.py)
    parts: tuple[str, ...] = ()  # the manifest parts of the images it took over
    behind: tuple[str, ...] = ()  # earlier runs that ended before the format's files had their records


@dataclass
class Generation:
    """What generation made, filled in as it goes: what a run that stops mid-way keeps."""

    result: PipelineResult = field(default_factory=PipelineResult)
    models: dict[str, dict] = field(default_factory=dict)  # what each model is: source, commit, dtype
    startup_seconds: float = 0.0
    plan: dict = field(default_factory=dict)  # the placement plan the run used, or why there was none
    settled: bool = False  # every image this run wrote is recorded (its mark on the output is removed)
    interrupted: Interrupted | None = None  # the Ctrl-C / SIGTERM that stopped a terminal run's stream


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
        slot: Callable[[CascadeConfig], contextlib.AbstractContextManager] | None = None,
        cancels: tuple[type[BaseException], ...] = (),
        listeners: Iterable[Callable[[str, int], Callable[[Progress], None]]] = (),
        executor=None,
        log_every_s: float = 10.0,
    ):
        self.params, self.cfg = RunParams.of(params), cfg
        self.run_id, self.started, self.t0 = new_run_id(), dt.datetime.now(dt.UTC).isoformat(), time.monotonic()
        self.loc = locate(self.params.output, cfg.s3)
        self.log = log or logging.getLogger("ifbatch.run")
        self.step = step
        self.slot = slot or (lambda cfg: contextlib.nullcontext())
        self.cancels = cancels
        self.listeners = list(listeners)
        self.executor = executor or executor_for(cfg.executor)
        self.log_every_s = log_every_s
        self.cancelled: RunRecord | None = None  # written once, by whichever of the stream or the run sees it first

    def __call__(self) -> RunRecord:
        p, log = self.params, self.log
        log.info("run %s: preset %s, %s -> %s", self.run_id, self.cfg.preset, p.prompts, p.output)
        self.step("preflight", self.preflight, 1)
        with (
            self.slot(self.cfg) as gpu_slot,  # the flow's: runs that share the GPUs queue
            Lease(self.loc, self.run_id).held(wait=p.wait, log=log.info),  # one run per output
        ):
            plan = self.step("read-prompts", self.read, 2)
            resumed = self.step("plan-resume", lambda: self.resume(plan.rows), 2)
            made = Generation()

            def record(status: str, stopped: RunStopped | None = None) -> RunRecord:
                return self.record(status, gpu_slot, plan, resumed, made, stopped)

            def cancel() -> None:  # what a run cancelled from outside did is recorded, once
                if self.cancelled is None:
                    self.cancelled = self.write(record("cancelled", RunStopped(Cancelled())))
                    log.warning("%s", self.cancelled.line)

            try:
                self.step("generate", lambda: self.generate(resumed.todo, made, cancel), 0)
                if made.interrupted is not None:
                    raise RunStopped(made.interrupted)
            except RunStopped as e:
                stopped = e
                status = "interrupted" if isinstance(e.cause, Interrupted) else "stopped"
                try:  # what it did record is in the format's files too (else its mark says so to the next run)
                    self.finish_files(resumed, made)
                except Exception as f:  # noqa: BLE001  (the store that stopped it, most often)
                    log.warning("the output's %s files were not brought up to date: %s", self.cfg.output.format, f)
                return self.step("write-stopped-record", lambda: self.write(record(status, stopped)), 0)
            except self.cancels:  # cancelled from outside (Prefect) before or after the stream
                cancel()
                raise
            return self.step("write-run-record", lambda: self.finish(plan, resumed, made, record), 2)

    # -- the steps ------------------------------------------------------------------------------------------------

    def preflight(self) -> None:
        """Before any model or cluster: the table's columns can be read and the output can be written."""
        preflight(self.params.prompts, self.params.output, self.cfg)

    def read(self) -> PromptPlan:
        prompts = self.params.prompts
        plan = read_prompts(prompts, self.cfg)
        self.log.info(
            "read %d rows from %s: %d valid, %d rejected", plan.total, prompts, plan.rows.num_rows, len(plan.rejected)
        )
        return plan

    def resume(self, rows: pa.Table) -> Resumed:
        """Rows still to generate. overwrite deletes earlier outputs first; otherwise rows already ok are skipped."""
        loc, log, output = self.loc, self.log, self.params.output
        if self.params.overwrite:
            for sub in (MANIFEST_DIR, *(fmt.folder for fmt in FORMATS.values())):
                if loc.fs.exists(loc.path(sub)):
                    loc.fs.rm(loc.path(sub), recursive=True)
            for kind in (OPEN, BEHIND):  # nothing of theirs is left to take over or to list
                for run in open_runs(loc, but=self.run_id, kind=kind):
                    mark_closed(loc, run, kind)
            log.info("--overwrite: removed earlier manifest, images and shards under %s", output)
            return Resumed(rows)
        # from writes a full disk or a kill cut short
        leftovers = loc.temp_files(IMAGES_DIR, SHARDS_DIR, MANIFEST_DIR, RUNS_DIR)
        for path in leftovers:
            loc.fs.rm_file(path)
        if leftovers:
            log.info("removed %d unfinished files earlier runs left (%s)", len(leftovers), ", ".join(leftovers[:3]))
        uploaded = unspill(loc)
        if uploaded:
            log.info("wrote %d records an earlier run kept while the store was down: %s", len(uploaded), uploaded)
        behind = tuple(open_runs(loc, but=self.run_id, kind=BEHIND))  # their records may be missing from the files
        unclean = open_runs(loc, but=self.run_id)
        if unclean:  # it may record the images they left
            mark_open(loc, self.run_id, BEHIND)
        taken = self.take_over(rows, unclean)
        adopted, parts = taken.images, tuple(taken.parts)
        for fmt in FORMATS.values() if unclean else ():  # only a run that ended unrecorded leaves what to tidy
            orphans = fmt.tidy(loc)  # what a reader would otherwise see twice once the run makes it again
            if orphans:
                log.info(
                    "removed %d %s no manifest record names (written by a run that ended before recording them; "
                    "their images are made again): %s",
                    len(orphans),
                    fmt.folder,
                    ", ".join(orphans[:5]) + (" ..." if len(orphans) > 5 else ""),
                )
        found = drift(loc, rows, self.cfg)
        done, changed = found.done, None
        if len(done) == 0:
            return Resumed(rows, adopted=adopted, parts=parts, behind=behind)
        if found.changes:
            in_place = FORMATS.of(self.cfg).remakes_in_place
            if self.cfg.data.on_changed_settings == "refuse" or not in_place:
                raise found.refusal(output, in_place)
            log.warning(
                "remaking %d images made with other settings (data.on_changed_settings=remake): %s",
                len(found.ids),
                found.summary(),
            )
            changed = found.record()
            done = pc.filter(done, pc.invert(pc.is_in(done, found.ids)))
        todo = without_done(rows, done)
        skipped = image_count(rows) - image_count(todo) - adopted
        log.info("resuming: %d images already in the manifest are skipped, %d to generate", skipped, image_count(todo))
        return Resumed(todo, skipped, adopted, changed, parts, behind)

    def take_over(self, rows: pa.Table, unclean: list[str]) -> Adopted:
        """After runs that ended before recording every image they wrote (`unclean`: their marks are left on the
        output): record the whole images they left that this run would make exactly so, and make only the rest
        (outputs/adopt.py)."""
        loc, log = self.loc, self.log
        if not unclean:
            return Adopted()
        adopted = take_over(loc, rows, self.cfg, self.run_id)
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
            return adopted
        for run in unclean:  # every image they left is recorded now, or will be made again
            mark_closed(loc, run)
        return adopted

    def generate(self, rows: pa.Table, made: Generation, cancel: Callable[[], None]) -> None:
        """Check the models, open the executor (Ray: start or join the cluster, plan and reserve the placement),
        stream the rows through the stages. Fills `made` as records come; a stream that fails after it started
        raises RunStopped (what was done is recorded); a Ctrl-C / SIGTERM on a terminal sets made.interrupted.
        cancel: records a run cancelled from outside (before the session's teardown: a cluster going away can hang
        it past the 30 s Prefect gives a cancelled run before SIGKILL)."""
        log, t0, cfg, run_id, loc = self.log, time.monotonic(), self.cfg, self.run_id, self.loc
        if cfg.tiny is not None and not tiny_ready(cfg.tiny.dir, cfg.tiny.seed):
            log.info(
                "building the tiny random-weight cascade in %s (first use; it loads like real weights)",
                cfg.tiny.dir,
            )
        cfg, made.models = resolve_cascade(cfg)
        images = image_count(rows)
        last = [0.0]

        def log_progress(p: Progress) -> None:
            if time.monotonic() - last[0] >= self.log_every_s or p.done + p.failed == p.total:
                last[0] = time.monotonic()
                log.info("progress: %s", p.line())

        stops = [listen(log_progress), *(listen(make(run_id, images)) for make in self.listeners)]
        try:
            explicit = override_keys(list(self.params.overrides))
            say = lambda line: log.info("%s", line)  # noqa: E731  (the executor's plan, a re-plan: when it happens)
            with self.executor.open(cfg, explicit, images, loc, say) as session:
                made.startup_seconds, made.plan = time.monotonic() - t0, session.record
                mark_open(loc, run_id)  # until every image it writes is recorded (outputs/adopt.py)
                mark_open(loc, run_id, BEHIND)  # until the format's files have every record it writes
                output, models = self.params.output, made.models
                stream = lambda rows, stop: session.records(rows, output, run_id, models, stop)  # noqa: E731
                settler = session if isinstance(session, Settler) else None
                try:
                    run_pipeline(
                        rows, session.cfg, loc, run_id, models, stream,
                        result=made.result, total=images, in_process=session.in_process, settler=settler,
                    )  # fmt: skip
                except Interrupted as e:  # the user stopped it: what was done is recorded, no error to show
                    made.interrupted, made.settled = e, e.settled
                    if e.late:
                        log.info(
                            "recorded %d images written before the stop whose records had not come (read back from "
                            "the images)",
                            e.late,
                        )
                except self.cancels:
                    cancel()
                    raise
                except Exception as e:  # generation had started: record what was done (RunStopped)
                    raise RunStopped(e) from e
                else:
                    made.settled = True  # the stream ended: every image it wrote came with its record
                finally:
                    made.plan = session.record  # a re-plan from the first images replaced it
        finally:
            for stop in stops:
                stop()

    def finish(
        self, plan: PromptPlan, resumed: Resumed, made: Generation, record: Callable[..., RunRecord]
    ) -> RunRecord:
        """Compact the run's manifest parts, write the format's end-of-run files, the rejected rows and the run
        record."""
        loc, result = self.loc, made.result
        if self.cfg.output.compact and len(result.parts) > 1:  # few large parts: what every resume and verify reads
            written, removed = compact(loc, self.run_id)
            if removed:
                result.parts = written
                self.log.info("merged the run's %d manifest parts into %d", len(removed), len(written))
        self.finish_files(resumed, made)
        rejected = write_rejected(loc, self.run_id, plan.rejected)
        status = "done" if result.failed == 0 and not plan.rejected else "failed"
        return self.write(dataclasses.replace(record(status), rejected_file=rejected), spill=False)

    def finish_files(self, resumed: Resumed, made: Generation) -> None:
        """The format's end-of-run files (formats.py `finish`: images/<ab>/metadata.parquet for files) for the
        images this run recorded -- for the whole output when an earlier run ended before its own (its mark is
        left) -- then this run's mark and theirs removed."""
        parts = [*resumed.parts, *made.result.parts]
        if resumed.behind:  # (an output may hold more than one format)
            for fmt in FORMATS.values():
                fmt.finish(self.loc)
        elif parts:
            FORMATS.of(self.cfg).finish(self.loc, read_manifest(self.loc, ["id"], paths=parts).column("id").to_pylist())
        for run in (*resumed.behind, self.run_id):
            mark_closed(self.loc, run, BEHIND)

    # -- the record -----------------------------------------------------------------------------------------------

    def record(
        self,
        status: str,
        gpu_slot: dict | None,
        plan: PromptPlan,
        resumed: Resumed,
        made: Generation,
        stopped: RunStopped | None = None,
    ) -> RunRecord:
        """The run's record as it stands: what it was given, what it made, and why it ended (`stopped`)."""
        result = made.result
        counts = Counts(
            total=plan.total,
            images=image_count(plan.rows),
            done=result.done,
            failed=result.failed,
            rejected=len(plan.rejected),
            skipped=resumed.skipped,
            adopted=resumed.adopted,
            filtered=result.filtered,
        )
        reason = signum = trace = None
        if stopped is not None:
            cause = stopped.cause
            if isinstance(cause, Interrupted):
                reason, signum = str(cause), cause.signum
            else:
                reason = f"{type(cause).__name__}: {cause}"
                if not isinstance(cause, Cancelled):
                    trace = cause_traceback(stopped)  # the terminal shows one line; the whole cause is here
        out = result.done + result.failed
        return RunRecord(
            run_id=self.run_id,
            output=self.params.output,
            status=status,  # type: ignore[arg-type]
            counts=counts,
            params=self.params,
            config=self.cfg.model_dump(mode="json"),
            started=self.started,
            finished=dt.datetime.now(dt.UTC).isoformat(),
            seconds=time.monotonic() - self.t0,
            reason=reason,
            signal=signum,
            traceback=trace,
            settled=made.settled,
            startup_seconds=made.startup_seconds,
            first_image_seconds=made.startup_seconds + result.marks[0][0] if result.marks else None,
            rows_per_second=result.done / result.seconds if result.seconds else 0.0,
            steady_rows_per_second=result.steady_rows_per_second,
            plan=made.plan,
            stage_seconds_per_image={k: v / out for k, v in result.stage_seconds.items()} if out else {},
            manifest_parts=list(result.parts),
            errors=list(result.errors),
            models=made.models,
            gpu_slot=gpu_slot,
            changed_settings=resumed.changed,
            versions=versions(),
        )

    def write(self, record: RunRecord, spill: bool = True) -> RunRecord:
        """Write the run record; free the output of the run's mark once every image it wrote is recorded (else the
        next run looks for what it left). spill: a run that stopped keeps its record in the spill folder while the
        store is down (the next run writes it); a finished run's step is retried instead."""
        try:
            where = write_run_record(self.loc, self.run_id, record.to_json())
            if record.settled:
                mark_closed(self.loc, self.run_id)
        except StoreDown as e:
            if not spill:
                raise
            where = str(e.spilled)
        return dataclasses.replace(record, run_record=where)
