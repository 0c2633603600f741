"""What a run is given and what it reports: its parameters (RunParams) and its outcome (RunRecord), one typed
object made once at the end of every run that got as far as its output -- done, failed, stopped, interrupted or
cancelled -- written as the run record (runs/<run_id>.json) and returned to every caller. The exit status of
`ifbatch run` is the record's, by the one mapping here (`exit_code`)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets
import signal
from dataclasses import dataclass, field
from typing import Any, Literal

from .stream.interrupt import exit_status

Status = Literal["done", "failed", "stopped", "interrupted", "cancelled"]
# done: every image made; failed: the run ended, some images failed or rows were rejected; stopped: generation
# started and then stopped (the store stayed down, a node left); interrupted: Ctrl-C / SIGTERM / SIGHUP on a
# terminal; cancelled: from outside (Prefect's Cancel). In every case what was done is recorded and a rerun resumes.
NOT_STARTED = 2  # the exit status of a run that could not start: bad arguments, config, table, output, model, lease


def new_run_id() -> str:
    return f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class RunParams:
    """A run's parameters as given (the flow's, `GenerateParams`; the CLI's arguments), typed; recorded in the run
    record as they are. The config resolved from them is the run's `cfg`."""

    prompts: str
    output: str
    preset: str = "tiny"
    overrides: tuple[str, ...] = ()
    prompt_column: str | None = None
    ray_address: str | None = None
    overwrite: bool = False
    wait: bool = False
    aws_credentials: str | None = None

    @classmethod
    def of(cls, given: Any) -> RunParams:
        """From a mapping or any object with these fields (the flow's pydantic parameters)."""
        if isinstance(given, RunParams):
            return given
        values = given if isinstance(given, dict) else {f: getattr(given, f) for f in cls.__dataclass_fields__}
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(
                f"unknown run parameters {sorted(unknown)}; expected some of {list(cls.__dataclass_fields__)}"
            )
        return cls(**{**values, "overrides": tuple(values.get("overrides") or ())})

    def record(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "overrides": list(self.overrides)}


@dataclass(frozen=True)
class Counts:
    """Images are what the valid rows ask for (images_per_prompt, or a row's n); done, failed, skipped and adopted
    count images, total and rejected count rows."""

    total: int = 0  # rows in the table
    images: int = 0
    done: int = 0  # by this run: recorded ok or filtered, not to be made again
    failed: int = 0
    rejected: int = 0  # rows
    skipped: int = 0  # made by earlier runs (resume)
    adopted: int = 0  # whole images an earlier run left unrecorded, recorded by this one (outputs/adopt.py)
    filtered: int = 0  # of done: best candidate under data.min_clip_score, recorded, not upscaled


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    output: str
    status: Status
    counts: Counts
    params: RunParams
    config: dict  # the resolved config, as JSON
    started: str
    finished: str
    seconds: float
    reason: str | None = None  # why a run that did not finish ended
    signal: int | None = None  # the signal that interrupted it
    traceback: str | None = None  # the whole chain of what stopped it (the terminal shows one line)
    settled: bool = True  # every image it wrote is recorded (else the next run takes over what it left)
    startup_seconds: float = 0.0  # models checked (the tiny ones built), the executor's start: cluster, placement
    first_image_seconds: float | None = None  # from the same start to the first image out (Ray: the models loaded)
    rows_per_second: float = 0.0  # while generating
    steady_rows_per_second: float = 0.0  # between 20% and 80% of the images out
    plan: dict = field(default_factory=dict)  # the placement plan the run used, or why there was none
    stage_seconds_per_image: dict[str, float] = field(default_factory=dict)
    manifest_parts: list[str] = field(default_factory=list)  # this run's, after compaction
    rejected_file: str | None = None
    errors: list[dict] = field(default_factory=list)  # the first failed images: id and error
    models: dict[str, dict] = field(default_factory=dict)  # what each model is: source, commit, dtype
    gpu_slot: dict | None = None  # the Prefect concurrency slot the run held
    changed_settings: dict | None = None  # done images remade for their other settings (outputs/drift.py)
    versions: dict[str, str | None] = field(default_factory=dict)
    run_record: str = ""  # where this record was written: the output's runs/, or the spill folder

    @property
    def ok(self) -> bool:
        return self.status == "done"

    @property
    def exit_code(self) -> int:
        """0 every image done; 1 some failed or rows were rejected, or it stopped or was cancelled (what was done
        is recorded: rerun to resume); 128 + the signal for an interrupted run (130 for Ctrl-C, 143 for SIGTERM)."""
        if self.status == "interrupted":
            return exit_status(self.signal or signal.SIGINT)
        return 0 if self.status == "done" else 1

    @property
    def counts_line(self) -> str:
        """A finished run's counts."""
        c = self.counts
        done = f"{c.done} images done" + (f" ({c.filtered} filtered under data.min_clip_score)" if c.filtered else "")
        return (
            f"{done}, {c.failed} failed, {c.skipped} skipped (already done){taken_over(c.adopted)} of "
            f"{c.images} images from {c.total} rows, {c.rejected} rows rejected"
        )

    @property
    def line(self) -> str:
        """The line the run ends with: what it did, where its record is, and what to do next."""
        if self.status in ("done", "failed"):
            return f"{self.counts_line}; run record {self.run_record}"
        c = self.counts
        kept = c.done + c.skipped + c.adopted
        counts = (
            f"{kept} of {c.images} images done and recorded ({c.done} by this run"
            f"{f', {c.adopted} taken over' if c.adopted else ''}), {c.failed} failed"
        )
        if self.status == "interrupted":
            whole = (
                "every image it wrote is recorded"
                if self.settled
                else "images it wrote whose records it could not have are taken over by the next run"
            )
            return (
                f"interrupted ({self.reason}): {counts}; {whole}; run record {self.run_record}. Rerun the same "
                f"command to make the other {c.images - kept}"
            )
        what = "cancelled" if self.status == "cancelled" else "stopped after generation started"
        return f"{what}: {counts}; run record {self.run_record}. {self.reason}. Rerun the same command to resume"

    def to_json(self) -> dict[str, Any]:
        """The run record as written (runs/<run_id>.json)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "run_record"}
        out.update(params=self.params.record(), counts=dataclasses.asdict(self.counts))
        return {k: v for k, v in out.items() if v is not None or k in ("gpu_slot", "changed_settings")}


def exit_code(outcome: RunRecord | BaseException | None) -> int:
    """The exit status of `ifbatch run`: the record's, or NOT_STARTED for a run that made no record."""
    return outcome.exit_code if isinstance(outcome, RunRecord) else NOT_STARTED


def taken_over(adopted: int) -> str:
    return f", {adopted} taken over (whole but unrecorded after an earlier run's unclean stop)" if adopted else ""


class Cancelled(Exception):
    """The reason a cancelled run's record gives (Prefect's Cancel reaches the run as a TerminationSignal)."""

    def __str__(self) -> str:
        return "the run was cancelled in Prefect"


class RunStopped(RuntimeError):
    """Generation started and then stopped (the store stayed down, a node left): what was done is recorded and a
    rerun resumes. `cause` is the error as the operator should read it."""

    def __init__(self, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause
