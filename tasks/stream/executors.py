"""Executors: what runs a run's stream. One pipeline -- the stage classes (stages.py) and writers (writer.py) --
and two ways to run it (datatrove's executors are the model):

- `ray` (ray/executor.py): Ray Data actor pools on a Ray cluster, planned and placed on its GPUs; the product's.
- `local` (local.py): the same classes chained in this process; for tests and for a machine without a cluster.

An executor's `open(cfg, explicit, images, loc, say)` is a context manager giving a session for one run (a Session):
the config the stream runs with, the plan it keeps in the run record, and `records(rows, output, run_id, models,
stop)`, the stream itself (it makes no more once `stop` is set). What the executor has to say (its plan, a
re-plan mid-run) it says through `say` when it happens; what only Ray does -- placement, re-planning, a lost node
named -- stays inside the Ray executor.
"""

from __future__ import annotations

import contextlib
import threading
import typing
from collections.abc import Callable, Iterator
from typing import Protocol

import pyarrow as pa

from ifbatch.configs.schema import CascadeConfig

from ..storage import Location
from .local import LocalExecutor
from .ray.executor import RayExecutor

EXECUTORS = typing.get_args(CascadeConfig.model_fields["executor"].annotation)  # the config's choices


class Session(Protocol):
    """One run's stream on an executor. A session whose stream computes elsewhere may also be a pipeline.Settler
    (Ray's: a stopped run records every image its writers wrote)."""

    cfg: CascadeConfig  # as the stream runs it (the plan applied)
    record: dict  # the run record's `plan` (a re-plan from the run's first images replaces it)
    in_process: bool  # the stream computes on the driver's thread (the local executor)

    def records(
        self, rows: pa.Table, output: str, run_id: str, models: dict, stop: threading.Event
    ) -> Iterator[pa.Table]: ...


class Executor(Protocol):
    name: str

    def open(
        self, cfg: CascadeConfig, explicit: frozenset[str], images: int, loc: Location, say: Callable[[str], None]
    ) -> contextlib.AbstractContextManager[Session]: ...


_local: LocalExecutor | None = None


def executor_for(name: str) -> Executor:
    """The executor of this name. The local one is kept for the process: its loaded models serve every run."""
    global _local
    if name == "local":
        _local = _local or LocalExecutor()
        return _local
    if name == "ray":
        return RayExecutor()
    raise ValueError(f"executor {name!r} is not one of {', '.join(EXECUTORS)}")
