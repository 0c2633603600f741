"""What one run knows, handed forward from step to step of the flow, and what it reports at the end."""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from ifbatch.configs.schema import CascadeConfig

from .inputs.prompts import PromptPlan
from .storage import Location, locate
from .stream.pipeline import PipelineResult


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


@dataclass
class RunContext:
    """Filled in as the flow goes: the table's plan, what resume skipped, the pipeline's result, the models."""

    params: RunParams
    cfg: CascadeConfig
    run_id: str = field(default_factory=new_run_id)
    started: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat())
    t0: float = field(default_factory=time.monotonic)
    plan: PromptPlan | None = None
    skipped: int = 0
    adopted: int = 0  # whole images an earlier run left unrecorded, recorded by this one (outputs/adopt.py)
    settled: bool = False  # every image this run wrote is recorded (its mark on the output is removed)
    changed: dict | None = None  # done images remade for their other settings (outputs/drift.py): how many, what
    result: PipelineResult = field(default_factory=PipelineResult)
    models: dict[str, dict] = field(default_factory=dict)  # what each model is: source, commit, dtype
    startup_seconds: float = 0.0
    stage_plan: dict = field(default_factory=dict)  # the placement plan the run used, or why there was none
    gpu_slot: dict | None = None  # the Prefect concurrency slot the run held: name, seconds waited, when taken
    interrupted: BaseException | None = None  # the Ctrl-C / SIGTERM that stopped a terminal run's stream
    cancelled: StoppedRun | None = None  # what a run cancelled from outside (Prefect) recorded, once it has

    @property
    def output(self) -> str:
        return self.params.output

    @property
    def loc(self) -> Location:
        return locate(self.output, self.cfg.s3)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.t0


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
    steady_rows_per_second: float = 0.0  # between 20% and 80% of the rows done
    plan: dict = field(default_factory=dict)  # the run record's plan: its estimate is plan["images_per_second"]
    images: int = 0  # images the valid rows ask for (images_per_prompt or a row's n); done/failed/skipped count these
    filtered: int = 0  # of done: recorded as filtered (best candidate under data.min_clip_score), not upscaled
    adopted: int = 0  # whole, unrecorded images an earlier run left, taken over (not counted in done or skipped)

    @property
    def line(self) -> str:
        done = (
            f"{self.done} images done ({self.filtered} filtered under data.min_clip_score)"
            if self.filtered
            else (f"{self.done} images done")
        )
        return (
            f"{done}, {self.failed} failed, {self.skipped} skipped (already done){taken_over(self.adopted)} of "
            f"{self.images} images from {self.total} rows, {self.rejected} rows rejected"
        )

    @property
    def report(self) -> str:
        """The line a finished run ends with: its counts and where its run record is."""
        return f"{self.line}; run record {self.run_record}"

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.rejected == 0


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


@dataclass
class StoppedRun:
    """What a run that stopped after generation started reports (the CLI exits 1, not 2: work was done)."""

    run_id: str
    output: str
    done: int
    failed: int
    images: int
    reason: str
    run_record: str  # where the run record went (the output, or the spill folder)
    status: str = "stopped"  # or "interrupted" (Ctrl-C / SIGTERM on a terminal), "cancelled" (in Prefect)
    exit_code: int = 1  # the CLI's: 1 for a stopped run, 128 + the signal for an interrupted one
    skipped: int = 0  # images earlier runs had made (resume)
    adopted: int = 0  # of those, taken over by this run (outputs/adopt.py)
    settled: bool = True  # every image it wrote is recorded (else the next run takes over what it left)

    @property
    def line(self) -> str:
        kept = self.done + self.skipped + self.adopted
        counts = (
            f"{kept} of {self.images} images done and recorded ({self.done} by this run"
            f"{f', {self.adopted} taken over' if self.adopted else ''}), {self.failed} failed"
        )
        if self.status == "interrupted":
            left = self.images - kept
            whole = (
                "every image it wrote is recorded"
                if self.settled
                else "images it wrote whose records it could not have are taken over by the next run"
            )
            return (
                f"interrupted ({self.reason}): {counts}; {whole}; run record {self.run_record}. Rerun the same "
                f"command to make the other {left}"
            )
        return (
            f"stopped after generation started: {counts}; run record {self.run_record}. {self.reason}. Rerun the "
            f"same command to resume"
        )
