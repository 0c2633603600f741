"""Executors: what runs a run's stream. One pipeline -- the stage classes (stages.py) and writers (writer.py) --
and two ways to run it (datatrove's executors are the model):

- `ray` (ray_data.py): Ray Data actor pools on a Ray cluster, planned and placed on its GPUs; the product's.
- `local` (local.py): the same classes chained in this process; for tests and for a machine without a cluster.

An executor's `open(cfg, explicit, images, loc)` is a context manager giving a session for one run (a Session):
the config the stream runs with, the plan it keeps in the run record, and `records(rows, output, run_id, models,
stop)`, the stream itself (it makes no more once `stop` is set).
"""

from __future__ import annotations

import threading
import typing
from collections.abc import Iterator
from typing import Protocol

import pyarrow as pa

from ifbatch.configs.schema import CascadeConfig

from .local import LocalExecutor
from .pipeline import PipelineResult
from .ray_data import RayExecutor

EXECUTORS = typing.get_args(CascadeConfig.model_fields["executor"].annotation)  # the config's choices


class Session(Protocol):
    name: str
    cfg: CascadeConfig  # as the stream runs it (the plan applied)
    record: dict  # the run record's `plan`
    lines: list[str]  # logged at the start

    def phases(self, rows: pa.Table, result: PipelineResult) -> Iterator[pa.Table]: ...
    def on_batch(self, result: PipelineResult) -> None: ...
    def said(self) -> list[str]: ...

    in_process: bool  # the stream computes on the driver's thread (the local executor)

    def records(
        self, rows: pa.Table, output: str, run_id: str, models: dict, stop: threading.Event
    ) -> Iterator[pa.Table]: ...
    def taken(self, records: pa.Table) -> None: ...  # pipeline.Settler
    def settle(self) -> pa.Table | None: ...
    def failed(self, error: BaseException) -> BaseException: ...


_local: LocalExecutor | None = None


def executor_for(name: str):
    """The executor of this name. The local one is kept for the process: its loaded models serve every run."""
    global _local
    if name == "local":
        _local = _local or LocalExecutor()
        return _local
    if name == "ray":
        return RayExecutor()
    raise ValueError(f"executor {name!r} is not one of {', '.join(EXECUTORS)}")
