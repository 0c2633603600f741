"""A run's stream, whatever runs it: rows in, manifest records out (from an executor: executors.py), written to
manifest parts as they come -- once `output.manifest_part_rows` records are in hand or
`output.manifest_flush_seconds` have passed, and whatever is in hand when the stream ends or fails.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import pyarrow as pa
import pyarrow.compute as pc

from ifbatch.configs.schema import STAGES, CascadeConfig

from ..inputs.expand import image_count
from ..outputs.manifest import DONE, write_part
from ..storage import Location
from . import interrupt
from .progress import Progress, report


@runtime_checkable
class Settler(Protocol):
    """A stream computing elsewhere (Ray: stream/ray/ledger.py): told of every record batch the driver takes, and, once
    the run is stopped, `settle` returns the records of the images written whose records had not come (None: it
    cannot tell; the next run takes them over)."""

    def taken(self, records: pa.Table) -> None: ...
    def settle(self) -> pa.Table | None: ...


# (rows, stop) -> the stream's record batches (an executor session's `records`, bound to the run's output and
# models). `stop` is set when the driver stops taking records (a stopped run, an error): a stream that computes in
# this process makes no more after its current step.
Stream = Callable[[pa.Table, threading.Event], Iterable[pa.Table]]


@dataclass
class PipelineResult:
    done: int = 0  # ok and filtered: recorded, not to be made again
    failed: int = 0
    filtered: int = 0  # of done: under data.min_clip_score
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
        status = records.column("status")
        ok = pc.is_in(status, pa.array(DONE))
        done = pc.sum(ok).as_py() or 0
        self.done += done
        self.failed += records.num_rows - done
        self.filtered += pc.sum(pc.equal(status, "filtered")).as_py() or 0
        if len(self.errors) < 20 and done < records.num_rows:
            failed = records.filter(pc.invert(ok)).select(["id", "error"]).slice(0, 20 - len(self.errors))
            self.errors += failed.to_pylist()
        for stage in (*STAGES, "write"):
            s = pc.sum(records.column(f"seconds_{stage}")).as_py()
            if s is not None:
                self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + s


def run_pipeline(
    rows: pa.Table,
    cfg: CascadeConfig,
    loc: Location,
    run_id: str,
    models: dict,
    stream: Stream,
    result: PipelineResult | None = None,
    total: int | None = None,
    in_process: bool = False,
    settler: Settler | None = None,
) -> PipelineResult:
    """Generate every row of `rows` (already validated, resume-filtered) through `stream` and write manifest parts
    (records of the models `models`, under `run_id`). `result` is filled as the rows come (so that a caller knows
    what was done when the stream fails). total: the images of the whole run, for progress (default: those of
    `rows`). in_process: the stream computes in this process (the local executor), so a stopped run waits for its
    current step before it goes on. settler: a stream computing elsewhere (Ray) records every image it wrote once
    stopped (Settler)."""
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
        for records in _records(lambda stop: stream(rows, stop), in_process, settler):
            pending.append(records)
            result.add(records)
            result.marks.append((time.monotonic() - t0, result.done + result.failed))
            if (
                sum(t.num_rows for t in pending) >= cfg.output.manifest_part_rows
                or time.monotonic() - last_flush >= cfg.output.manifest_flush_seconds
            ):
                flush()
            report(Progress(result.done, result.failed, images, t0))
    finally:
        flush()  # also when the stream failed: what was written is recorded, and a rerun resumes after it
    result.seconds = time.monotonic() - t0
    return result


@contextlib.contextmanager
def _setting(event: threading.Event) -> Iterator[None]:
    """Set `event` when the block is left, however."""
    try:
        yield
    finally:
        event.set()


def _records(
    stream: Callable[[threading.Event], Iterable[pa.Table]],
    in_process: bool,
    settler: Settler | None = None,
) -> Iterator[pa.Table]:
    """The stream's record batches. On a terminal run (interrupt.arm) they are taken on a thread of their own, so
    that the first Ctrl-C or SIGTERM is seen at once; then every image already written is recorded and Interrupted
    is raised (the caller's `finally` writes the records to the manifest). No grace period to guess:

    in_process: the stream's thread computes (the local executor's models run on it). The first signal stops it at
    once: the step under way finishes, no other starts, and every image it wrote is taken (the thread is all the
    work there is). Once the driver leaves, for whatever reason, that thread is waited for: a process must not exit
    while a thread of its own is inside torch (its thread pools are torn down under it: `terminate called without
    an active exception`, SIGABRT).

    Otherwise (Ray: the work is out on the cluster) the settler stops the writers and waits for the writes under
    way (stream/ray/ledger.py); the records in hand are taken, then those of the images written whose records had not
    come (read back from the images). A busy machine only makes this slower, never lossy. The settler hears of
    every batch as the driver takes it, from this thread (so that its later questions come after)."""
    stop = threading.Event()
    told = settler.taken if settler is not None else lambda records: None
    if not interrupt.armed():
        with _setting(stop):
            for records in stream(stop):
                told(records)
                yield records
        return
    out: queue.Queue = queue.Queue()

    def pump() -> None:
        try:
            for b in stream(stop):
                out.put(("records", b))
                if stop.is_set():  # the run stopped: make no more
                    break
            out.put(("end", None))
        except BaseException as e:  # handed to the driver's thread, which raises it
            out.put(("error", e))

    thread = threading.Thread(target=pump, name="ifbatch-stream", daemon=True)
    thread.start()
    try:
        with interrupt.stop_switch() as switch, _setting(stop):
            while True:
                if switch.on:
                    stop.set()
                    if not in_process:  # (in process: the step under way finishes, then the thread's "end")
                        yield from _settled(out, settler, switch.signum)
                try:
                    kind, value = out.get(timeout=0.2)
                except queue.Empty:
                    continue
                if kind == "end":
                    if switch.on:
                        raise interrupt.Interrupted(switch.signum)
                    return
                if kind == "error":
                    raise value
                told(value)
                yield value
    finally:
        if in_process:  # (a Ray stream's thread only waits on the cluster: nothing of it runs here)
            thread.join()


def _settled(out: queue.Queue, settler: Settler | None, signum: int) -> Iterator[pa.Table]:
    """A stream on the cluster, stopped: writers settled first (no write after), then the records in hand, then
    those of images written whose records had not come (less those in hand). Raises Interrupted, settled or not."""
    late = settler.settle() if settler is not None else None
    taken: set[str] = set()
    while True:
        try:
            kind, value = out.get_nowait()
        except queue.Empty:
            break
        if kind == "records":
            taken |= set(value.column("id").to_pylist())
            yield value
    if late is not None and late.num_rows:
        late = late.filter(pc.invert(pc.is_in(late.column("id"), pa.array(sorted(taken), pa.string()))))
        if late.num_rows:
            yield late
    raise interrupt.Interrupted(signum, settled=late is not None, late=late.num_rows if late is not None else 0)
