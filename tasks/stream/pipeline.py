"""The Ray Data pipeline: rows -> text encoder -> stage I -> stage II -> stage III -> writer, streamed, with
manifest parts.

Each stage is an actor pool (one loaded model per actor, `num_gpus`/`num_cpus`/`replicas`/`batch_size` from
the config); Ray Data restarts dead actors and retries their batches (the stage calls are idempotent). Only
manifest records (Arrow, no pixels) come back to the driver, which writes a manifest part once
`output.manifest_part_rows` records are in hand or `output.manifest_flush_seconds` have passed.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from ifbatch.configs.schema import STAGES, CascadeConfig

from ..inputs.expand import image_count
from ..outputs.manifest import write_part
from ..storage import Location
from . import interrupt
from .progress import Progress, report
from .stages import STAGE_ACTORS
from .writer import ImageWriter, ShardWriter

BLOCK_BYTES = 64 << 10  # see build_dataset
SHARD_WRITER_CPUS = 0.25
ACTOR_START_S = 600  # how long a stage's actors may take to start and load their models


@dataclass
class PipelineResult:
    done: int = 0
    failed: int = 0
    parts: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)  # summed per-row seconds
    errors: list[dict] = field(default_factory=list)  # first few failed rows: id and error
    marks: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, rows out) per batch

    def window(self, low: float = 0.2, high: float = 0.8, min_marks: int = 5) -> tuple[float, int, float, int] | None:
        """(seconds, rows out) at the first marks where `low` and `high` of the rows had come out; None when fewer
        than `min_marks` batches came out (too few to tell)."""
        total = self.done + self.failed
        if len(self.marks) < max(min_marks, 1):
            return None
        t_low, n_low = next((t, n) for t, n in self.marks if n >= low * total)
        t_high, n_high = next((t, n) for t, n in self.marks if n >= high * total)
        return t_low, n_low, t_high, n_high

    @property
    def steady_rows_per_second(self) -> float:
        """Rows/s between the times 20% and 80% of the rows came out: the rate without start-up and drain
        (the whole run's rate when too few batches came out to tell)."""
        total = self.done + self.failed
        w = self.window()
        if w is None or w[2] <= w[0]:
            return total / self.seconds if self.seconds else 0.0
        return (w[3] - w[1]) / (w[2] - w[0])

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


def build_dataset(
    rows: pa.Table,
    cfg: CascadeConfig,
    output: str,
    groups: dict | None = None,
    actors=None,
    models: dict | None = None,
    run_id: str = "run",
):
    """The lazy Ray Data pipeline. groups: {stage: placement group} from a plan (cluster.reserve), each stage's
    actors then land in its group's bundles; actors: the stage actor classes (default STAGE_ACTORS)."""
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
    # Every actor of a stage is up before rows flow to it. Started lazily, the first replicas up took every
    # batch while the others loaded (measured, 4 fake GPUs: two of four stage I replicas did all of its work).
    ctx.wait_for_min_actors_s = ACTOR_START_S
    step = cfg.text_encoder.batch_size
    images = image_count(rows)
    ds = ray.data.from_arrow([rows.slice(i, step) for i in range(0, rows.num_rows, step)])
    actors = actors or STAGE_ACTORS
    for stage in STAGES:
        sc = getattr(cfg, stage)
        where = {}
        if groups and stage in groups:
            where["scheduling_strategy"] = PlacementGroupSchedulingStrategy(groups[stage])
        # Ray 2.60 takes the strategy only as a "remote arg", deprecated for 2.64 with no replacement released
        # yet (ray#64090 adds per-actor placement groups to map_batches); the pin keeps it working until then.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
            ds = _map_stage(ds, actors[stage], cfg, sc, where, in_flight(images, sc.batch_size, sc.replicas))
    return _write(ds, cfg, output, run_id, models or {})


def _write(ds, cfg: CascadeConfig, output: str, run_id: str, models: dict):
    """The writer pool (output.writers actors, sized to the plan): encode each image and write it as a file, or
    hand it on to the shard writers, which take output.shard_samples images a call and write each batch as a
    shard (tar assembly and one upload: a quarter of the encoders' count is plenty)."""
    import ray

    writers = cfg.output.writers or 1
    ds = ds.map_batches(
        ImageWriter,
        fn_constructor_kwargs=dict(cfg=cfg, output=output, models=models),
        batch_size=cfg.stage_3.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=writers, max_concurrent_calls_per_actor=2),  # upload || encode
        num_cpus=cfg.output.writer_cpus,
    )
    if cfg.output.format == "files":
        return ds
    return ds.map_batches(
        ShardWriter,
        fn_constructor_kwargs=dict(cfg=cfg, output=output, run_id=run_id),
        batch_size=cfg.output.shard_samples,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=max(1, -(-writers // 4))),
        num_cpus=SHARD_WRITER_CPUS,
    )


def in_flight(rows: int, batch_size: int, replicas: int) -> int:
    """Batches an actor may hold at once. One, while a stage has few batches per replica: a batch queued behind
    another on a busy actor waits while a replica on another GPU idles (measured: with Ray's default queue one
    stage I replica of four got no batch at all). Two, when every replica has many batches to come: the next
    batch is then at hand when one ends, and the GPU does not idle between them (the drain of a run, where
    stage III runs alone, lost ~10% of the GPU time to those gaps)."""
    return 2 if rows >= 4 * batch_size * replicas else 1


def _map_stage(ds, actor, cfg: CascadeConfig, sc, where: dict, tasks_per_actor: int):
    import ray

    # Two calls per actor at once, the stage's own work one at a time (Ray Data's documented mode for GPU
    # actors): Ray Data's own part of a call -- turning the returned numpy batch into Arrow blocks and storing
    # them, fetching and formatting the next batch -- then overlaps the model call instead of following it.
    # It cost 0.3 s of every 1.1 s stage III call on the 2-core machine (GPU busy 81% -> 99% at N = 1).
    return ds.map_batches(
        actor,
        fn_constructor_kwargs={"cfg": cfg},
        batch_size=sc.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            size=sc.replicas, max_tasks_in_flight_per_actor=tasks_per_actor, max_concurrent_calls_per_actor=2
        ),
        num_gpus=sc.num_gpus,
        num_cpus=sc.num_cpus,
        **where,
    )


def run_pipeline(
    rows: pa.Table,
    cfg: CascadeConfig,
    loc: Location,
    output: str,
    run_id: str,
    models: dict,
    groups: dict | None = None,
    actors=None,
    result: PipelineResult | None = None,
    on_batch: Callable[[PipelineResult], None] | None = None,
    total: int | None = None,
) -> PipelineResult:
    """Generate every row of `rows` (already validated, resume-filtered) and write manifest parts. `result` is
    filled as the rows come (so that a caller knows what was done when the stream fails); a result passed in from
    an earlier phase of the same run is added to. on_batch: called with the result after each batch of records.
    total: the images of the whole run, for progress (default: those of `rows`)."""
    result = PipelineResult() if result is None else result
    if rows.num_rows == 0:
        return result
    t0 = time.monotonic() - result.seconds
    images = total or image_count(rows)
    models_json = json.dumps(models, sort_keys=True)
    pending: list[pa.Table] = []
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal last_flush
        if pending:
            table = pa.concat_tables(pending)
            pending.clear()  # written, or spilled (StoreDown): either way not again
            result.parts.append(write_part(loc, table, run_id, models_json, len(result.parts), spill=True))
        last_flush = time.monotonic()

    try:
        ds = build_dataset(rows, cfg, output, groups, actors, models, run_id)
        for records in _records(ds):
            pending.append(records)
            result.add(records)
            result.marks.append((time.monotonic() - t0, result.done + result.failed))
            if (
                sum(t.num_rows for t in pending) >= cfg.output.manifest_part_rows
                or time.monotonic() - last_flush >= cfg.output.manifest_flush_seconds
            ):
                flush()
            report(Progress(result.done, result.failed, images, t0))
            if on_batch is not None:
                on_batch(result)
    finally:
        flush()  # also when the stream failed: what was written is recorded, and a rerun resumes after it
    result.seconds = time.monotonic() - t0
    return result


def _records(ds) -> Iterator[pa.Table]:
    """The stream's record batches. On a terminal run (interrupt.arm) they are taken on a thread of their own, so
    that the first Ctrl-C or SIGTERM is seen at once: the records already on their way out are taken for
    interrupt.GRACE_S more seconds (each is a finished image), then Interrupted is raised and the caller's
    `finally` writes them to the manifest."""
    batches = ds.iter_batches(batch_size=None, batch_format="pyarrow")
    if not interrupt.armed():
        yield from batches
        return
    out: queue.Queue = queue.Queue()

    def pump() -> None:
        try:
            for b in batches:
                out.put(("records", b))
            out.put(("end", None))
        except BaseException as e:  # handed to the driver's thread, which raises it
            out.put(("error", e))

    threading.Thread(target=pump, name="ifbatch-stream", daemon=True).start()
    with interrupt.stop_switch() as switch:
        deadline = None
        while True:
            if switch.on and deadline is None:
                deadline = time.monotonic() + interrupt.GRACE_S
            if deadline is not None and time.monotonic() >= deadline:
                raise interrupt.Interrupted(switch.signum)
            wait = 0.2 if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                kind, value = out.get(timeout=wait)
            except queue.Empty:
                if deadline is not None:
                    raise interrupt.Interrupted(switch.signum) from None
                continue
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
