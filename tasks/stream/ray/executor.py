"""The Ray executor: rows -> text encoder -> stage I -> stage II -> stage III -> writer as a Ray Data stream, each
stage an actor pool (one loaded model per actor, `num_gpus`/`num_cpus`/`replicas`/`batch_size` from the config,
placed in the plan's placement groups); Ray Data restarts dead actors and retries their batches (the stage calls
are idempotent). Only manifest records (Arrow, no pixels) come back to the driver.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from ifbatch.configs.schema import CascadeConfig

from ...inputs.expand import image_count
from ...outputs.formats import FORMATS
from ...outputs.manifest import RECORD_SCHEMA, SCHEMA
from ...storage import Location, locate
from ..pipeline import PipelineResult
from ..stages import STEPS
from .ledger import read_back, settle, start_ledger
from .placing import Calibration, Placement, placed
from .session import ray_session
from .startup import load_failure, loads_apart

BLOCK_BYTES = 64 << 10  # see build_dataset
ACTOR_START_S = 600  # how long a stage's actors may take to be up (their models load after: startup.py)


@dataclass
class RaySession:
    """A run on the Ray cluster: the plan placed and reserved (placing.py), corrected from the run's first images
    when its costs were estimates (Calibration), all inside `records`. A Settler (pipeline.py): a stopped run
    records every image its writers wrote (ledger.py)."""

    placement: Placement
    calibration: Calibration
    say: Callable[[str], None]  # what the session has to say (a re-plan), when it happens
    actors: dict | None = None  # classes standing in for some steps, by name (the cluster simulation's)
    in_process: bool = False  # the driver's stream thread only waits on the cluster
    streams: list = field(default_factory=list)  # the Ray datasets this session started (close stops them)
    ledger: object = None  # the current stream's (ledger.py)
    output: str = ""

    @property
    def cfg(self) -> CascadeConfig:
        return self.placement.cfg

    @property
    def record(self) -> dict:
        return self.placement.record

    def records(
        self, rows: pa.Table, output: str, run_id: str, models: dict, stop: threading.Event
    ) -> Iterator[pa.Table]:
        """The stream's records. A stream that fails raises the error to report: the lost node when that was the
        cause (placing.Placement.failed)."""
        try:
            yield from self._calibrated(rows, output, run_id, models)
        except Exception as e:
            reported = self.placement.failed(e)
            if reported is e:
                reported = load_failure(e) or e
            if reported is e:
                raise
            raise reported from e

    def _calibrated(self, rows: pa.Table, output: str, run_id: str, models: dict) -> Iterator[pa.Table]:
        """The rows as one stream, the plan corrected as soon as its first images are out (a plan of one group);
        or, when a plan of estimated costs splits the GPUs between stage groups, its first images as a phase of
        their own, then the plan corrected from their timings (its groups reserved again), then the rest."""
        calibration, seen = self.calibration, PipelineResult()
        phases = [rows]
        if calibration.phased:
            first = calibration.first_rows(rows)
            phases = [rows.slice(0, first), rows.slice(first)]
        for k, phase in enumerate(phases):
            if k:  # between the phases
                calibration.calibrate(seen)
                self._said()
            if phase.num_rows == 0:
                continue
            for records in self._stream(phase, output, run_id, models):
                seen.add(records)
                calibration(seen)
                self._said()
                yield records

    def _said(self) -> None:
        lines, self.calibration.lines = self.calibration.lines, []
        for line in lines:
            self.say(line)

    def _stream(self, rows: pa.Table, output: str, run_id: str, models: dict) -> Iterator[pa.Table]:
        """One Ray Data stream of the rows (`stop` is not needed: the driver only waits on the cluster, and the
        actors end with the session). A node lost mid-run that Ray Data keeps waiting for: the node watch stops the
        stream (cluster.NodeWatch), which then fails here, whatever Ray Data made of the stop."""
        self.ledger, self.output = start_ledger(), output
        ds = build_dataset(
            rows, self.placement.cfg, output, self.placement.groups, self.actors, models, run_id, self.ledger
        )
        self.streams.append(ds)
        watch = self.placement.watch
        if watch is not None:
            watch.on_lost = self.close
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
        if watch is not None and watch.stopped_stream:
            raise RuntimeError(f"the stream was stopped: {watch.lost}")

    def taken(self, records: pa.Table) -> None:
        """The driver has these records (told from its own thread, before it asks anything else of the ledger)."""
        if self.ledger is not None:
            self.ledger.received.remote(records.column("id").to_pylist())

    def settle(self) -> pa.Table | None:
        """Once the run is stopped: no write starts after this, those under way end, and the records of every image
        written whose record has not come through the stream are read back from the output (each image carries its
        record). None when a writer died mid-write (the next run takes over what it left)."""
        if self.ledger is None:
            return SCHEMA.empty_table().select(RECORD_SCHEMA.names)
        written = settle(self.ledger)
        if written is None:
            return None
        return read_back(written, locate(self.output, self.cfg.s3), self.cfg.output.format)

    def close(self) -> None:
        """Stop every stream this session started, before its placement groups and cluster go. A stream the run
        stopped taking records from (Ctrl-C, a failed write) is still running on Ray Data's executor thread; left
        to find the cluster gone, it printed a traceback ("Ray has not been started yet") after the run's last
        line."""
        for ds in self.streams:
            stop_stream(ds)
        self.streams.clear()


def stop_stream(ds) -> bool:
    """Shut the executor of a dataset whose stream is running, from any thread; whether one was running. Ray Data
    keeps it as `_current_executor` (what its own `take` shuts), a private name: tests/e2e/test_ledger.py fails
    when an upgrade changes it."""
    executor = getattr(ds, "_current_executor", None)
    if executor is None:
        return False
    with contextlib.suppress(Exception):
        executor.shutdown(force=True)
    return True


class RayExecutor:
    """Runs the stream on a Ray cluster: a private local one, or ray.address / RAY_ADDRESS."""

    name = "ray"

    def __init__(self, actors: dict | None = None):
        self.actors = actors

    @contextlib.contextmanager
    def open(
        self, cfg: CascadeConfig, explicit: frozenset[str], images: int, loc: Location, say: Callable[[str], None]
    ) -> Iterator[RaySession]:
        with ray_session(cfg.ray), placed(cfg, explicit, images, loc) as placement:
            for line in placement.lines:
                say(line)
            session = RaySession(placement, Calibration.of(placement, cfg, explicit, images), say, self.actors)
            try:
                yield session
            finally:
                session.close()


def build_dataset(
    rows: pa.Table,
    cfg: CascadeConfig,
    output: str,
    groups: dict | None = None,
    actors=None,
    models: dict | None = None,
    run_id: str = "run",
    ledger=None,
):
    """The lazy Ray Data pipeline. groups: {stage: placement group} from a plan (cluster.reserve), each stage's
    actors then land in its group's bundles; actors: classes standing in for some steps (stages.STEPS); ledger: what
    the writers ask before each write (ledger.py)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # A map task's output is cut into blocks of at most this many bytes, and a block goes whole to one actor of
    # the next stage. At Ray's default (128 MB) stage I's batch of 32 left as one block, so one stage II actor
    # and then one stage III actor got all 32 rows while the other replicas idled (measured: marks arrived in
    # two lumps at the end). Every row between stages is larger than 64 KB (the smallest, stage I's output, is a
    # 24 KB 64 px image travelling with its 1.3 MB of embeddings), so each block holds one row: every replica of
    # the next stage takes a share, and Ray Data, which bundles whole blocks up to a batch, makes whole batches.
    # At 1 MB, blocks of 2-3 stage II rows gave stage III (batch 4) a batch of 4 and one of 2, over and over
    # (8 of 19 calls were short at N = 1).
    ctx.target_max_block_size = BLOCK_BYTES
    # Every actor of a stage is up before rows flow to it (up: its process started; its models load after, every
    # stage's at once: startup.py), so each replica's queue gets its share. Started lazily, the first replicas up
    # took every batch while the others loaded (measured, 4 fake GPUs: two of four stage I replicas did all).
    ctx.wait_for_min_actors_s = ACTOR_START_S
    step = cfg.text_encoder.batch_size
    images = image_count(rows)
    # from_blocks reads the blocks' metadata here, in the driver. from_arrow runs a task of 1 CPU for it, which
    # waits for ever once the placement groups (reserved before this) leave less than a whole CPU free on every
    # node: measured on a 2-CPU node, best of k's fifth stage took it to 0.75 CPU free and the run hung.
    ds = ray.data.from_blocks([rows.slice(i, step) for i in range(0, rows.num_rows, step)])
    for step in STEPS.for_run(cfg, actors):
        rows_per_call = step.rows_per_call(cfg)
        where = {}
        if groups and step.name in groups:
            where["scheduling_strategy"] = PlacementGroupSchedulingStrategy(groups[step.name])
        # Ray 2.60 takes the strategy only as a "remote arg", deprecated for 2.64 with no replacement released
        # yet (ray#64090 adds per-actor placement groups to map_batches); the pin keeps it working until then.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
            ds = _map_stage(ds, step, cfg, rows_per_call, where, images)
    return _write(ds, cfg, output, run_id, models or {}, ledger)


def _write(ds, cfg: CascadeConfig, output: str, run_id: str, models: dict, ledger=None):
    """The writer pools of the output's format (formats.Format.writers), each sized to its share of output.writers
    (sized to the plan)."""
    import ray

    writers = cfg.output.writers or 1
    for step in FORMATS.of(cfg).writers(cfg, output, run_id, models, ledger):
        ds = ds.map_batches(
            step.cls,
            fn_constructor_kwargs=step.kwargs,
            batch_size=step.batch_size,
            batch_format=step.batch_format,
            compute=ray.data.ActorPoolStrategy(
                size=max(1, math.ceil(writers * step.share)), max_concurrent_calls_per_actor=step.calls
            ),
            num_cpus=step.num_cpus,
        )
    return ds


def in_flight(rows: int, batch_size: int, replicas: int) -> int:
    """Batches an actor may hold at once. One, while a stage has few batches per replica: a batch queued behind
    another on a busy actor waits while a replica on another GPU idles (measured: with Ray's default queue one
    stage I replica of four got no batch at all). Two, when every replica has many batches to come: the next
    batch is then at hand when one ends, and the GPU does not idle between them (the drain of a run, where
    stage III runs alone, lost ~10% of the GPU time to those gaps)."""
    return 2 if rows >= 4 * batch_size * replicas else 1


def _map_stage(ds, step, cfg: CascadeConfig, rows_per_call: int, where: dict, images: int):
    """One step's actor pool: a stage's replicas and resources from its section (as planned), another step's one
    actor with its class's CPUs and no GPU."""
    import ray

    sc = step.section(cfg)
    replicas, gpus, cpus = (sc.replicas, sc.num_gpus, sc.num_cpus) if sc is not None else (1, 0.0, step.num_cpus)

    # Two calls per actor at once, the stage's own work one at a time (Ray Data's documented mode for GPU
    # actors): Ray Data's own part of a call -- turning the returned numpy batch into Arrow blocks and storing
    # them, fetching and formatting the next batch -- then overlaps the model call instead of following it.
    # It cost 0.3 s of every 1.1 s stage III call on the 2-core machine (GPU busy 81% -> 99% at N = 1).
    return ds.map_batches(
        loads_apart(step),
        fn_constructor_kwargs={"cfg": cfg},
        batch_size=rows_per_call,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            size=replicas,
            max_tasks_in_flight_per_actor=in_flight(images, rows_per_call, replicas),
            max_concurrent_calls_per_actor=2,
        ),
        num_gpus=gpus,
        num_cpus=cpus,
        **where,
    )
