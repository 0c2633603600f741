"""The local executor: the same stage classes (stages.py) and writers (writer.py) as the Ray stream, chained in
this process, one batch at a time at each stage's batch size. For tests, and for a machine without a Ray cluster
(a laptop, a CI runner): the images are the ones the Ray stream makes from the same batches.

Models load once per executor and stay loaded across its runs (a test session makes many runs)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ifbatch.configs.schema import CascadeConfig

from ..outputs.formats import FORMATS
from ..storage import Location
from .stages import STEPS, StageActor

Batch = dict[str, np.ndarray]


def numpy_batch(table: pa.Table) -> Batch:
    """An Arrow table as the stage classes take it (Ray Data's batch_format="numpy"): one array per column,
    strings and lists as object arrays, nullable integers as floats with NaN."""
    return {name: table.column(name).to_numpy() for name in table.column_names}


def rebatch(batches: Iterable[Batch], size: int) -> Iterator[Batch]:
    """The batches cut and joined into batches of `size` rows (the last may be short)."""
    held: list[Batch] = []
    count = 0
    for b in batches:
        n = len(b["id"])
        if n == 0:
            continue
        held.append(b)
        count += n
        while count >= size:
            joined = _join(held)
            yield {k: v[:size] for k, v in joined.items()}
            rest = {k: v[size:] for k, v in joined.items()}
            count -= size
            held = [rest] if count else []
    if count:
        yield _join(held)


def _join(batches: list[Batch]) -> Batch:
    if len(batches) == 1:
        return batches[0]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def retable(tables: Iterable[pa.Table], size: int) -> Iterator[pa.Table]:
    """Arrow record batches cut and joined into tables of `size` rows (the shard writer's input)."""
    held: pa.Table | None = None
    for t in tables:
        held = t if held is None else pa.concat_tables([held, t])
        while held.num_rows >= size:
            yield held.slice(0, size)
            held = held.slice(size)
    if held is not None and held.num_rows:
        yield held


def _until(stop: threading.Event, items: Iterable) -> Iterator:
    """`items` until `stop` is set."""
    for item in items:
        if stop.is_set():
            return
        yield item


@dataclass
class LocalSession:
    """A run in this process: no cluster, no placement; the config as given."""

    cfg: CascadeConfig
    executor: LocalExecutor
    in_process: bool = True  # the stream computes on the driver's thread (pipeline._records waits for it)
    record: dict = field(
        default_factory=lambda: {"mode": "local", "reason": "executor=local: every stage runs in this process"}
    )

    def records(
        self, rows: pa.Table, output: str, run_id: str, models: dict, stop: threading.Event
    ) -> Iterator[pa.Table]:
        """The chain, lazily: each stage and writer is called on its input cut to its batch size, and no call is
        made once `stop` is set (the one running finishes)."""
        cfg = self.cfg
        first = cfg.text_encoder.batch_size
        stream: Iterable[Batch] = (numpy_batch(rows.slice(i, first)) for i in range(0, rows.num_rows, first))
        for step in STEPS.for_run(cfg, self.executor.actors):
            stream = map(self.executor.stage(cfg, step), _until(stop, rebatch(stream, step.rows_per_call(cfg))))
        out: Iterable = stream
        for writer in FORMATS.of(cfg).writers(cfg, output, run_id, models):  # the output format's writers
            cut = rebatch if writer.batch_format == "numpy" else retable
            out = map(writer.cls(**writer.kwargs), _until(stop, cut(out, writer.batch_size)))
        yield from out


class LocalExecutor:
    """Runs the stream in this process: the steps (stages.STEPS), and `actors` standing other classes in for some
    of them (by name: a test's stand-ins)."""

    name = "local"

    def __init__(self, actors: dict | None = None):
        self.actors = actors or {}
        self._loaded: dict[type, tuple[str, object]] = {}  # step -> (what it loaded, the step object)

    def stage(self, cfg: CascadeConfig, step: type[StageActor]):
        """The step's object, loaded once and kept while what it loaded stays the same (StageActor.load_key)."""
        key = step.load_key(cfg)
        held = self._loaded.get(step)
        if held is None or held[0] != key:
            self._loaded[step] = (key, step(cfg))
        return self._loaded[step][1]

    @contextlib.contextmanager
    def open(
        self, cfg: CascadeConfig, explicit: frozenset[str], images: int, loc: Location, say: Callable[[str], None]
    ) -> Iterator[LocalSession]:
        """(Nothing to settle when stopped: the stream finishes its step under way on the driver's thread, records
        and all.)"""
        say("plan: local: every stage runs in this process, one batch at a time (executor=local)")
        yield LocalSession(cfg, self)
