"""What a Ray run's writers are writing, and which images they wrote whose records the driver has not had yet: so that
a stopped run (Ctrl-C, SIGTERM) records every image it wrote, with no grace period to guess.

An image's record reaches the driver through Ray Data's stream, after the image is durable; on a busy machine that
took longer than any fixed wait (a run stopped with 4 images whole and none recorded). With the ledger the writers
ask before each write (`begin`: refused once the run stops, so nothing is written after) and say when it is done
(`end`); the driver says which records it has (`received`). Once stopped, the driver waits until no write is under
way (`settle`), then reads the images written but not received back from the output: each carries its record
(outputs/unrecorded.py). A writer that dies mid-write leaves its entry open: once it is STUCK_S old, the driver
stops waiting for it and leaves what it wrote to the next run, which takes it over (outputs/adopt.py).
"""

from __future__ import annotations

import time

import pyarrow as pa

from ...outputs.formats import FORMATS
from ...outputs.manifest import RECORD_SCHEMA, SCHEMA
from ...storage import Location

STUCK_S = 120.0  # a write open this long: its writer is gone (a 1 GiB shard's PUT takes seconds)


class Ledger:
    """The Ray actor (num_cpus=0, one per stream) the writers and the driver share."""

    def __init__(self) -> None:
        self.open = True
        self.seq = 0
        # writes under way: when each began, and its (image id, its file or shard)
        self.pending: dict[int, tuple[float, list[tuple[str, str]]]] = {}
        self.written: dict[str, str] = {}  # image id -> its file or shard, its record not received yet

    def begin(self, items: list[tuple[str, str]]) -> int | None:
        """Before a write of these (id, file or shard): its number, or None once the run has stopped."""
        if not self.open:
            return None
        self.seq += 1
        self.pending[self.seq] = (time.monotonic(), items)
        return self.seq

    def end(self, seq: int) -> None:
        for image, unit in self.pending.pop(seq, (0.0, []))[1]:
            self.written[image] = unit

    def received(self, ids: list[str]) -> None:
        for image in ids:
            self.written.pop(image, None)

    def close(self) -> None:
        self.open = False

    def state(self, stuck_s: float = STUCK_S) -> tuple[int, int, dict[str, str]]:
        """(writes under way, of which open longer than stuck_s, the written images whose records the driver
        lacks)."""
        now = time.monotonic()
        stuck = sum(now - began > stuck_s for began, _ in self.pending.values())
        return len(self.pending), stuck, dict(self.written)


def start_ledger():
    """A Ledger actor for one stream (no CPU of the plan's: it only keeps lists), on the driver's node (the head's,
    for a driver joined through Ray Client): a worker node that leaves mid-run must not take with it what the run's
    writers wrote (left to Ray's scheduler, it landed on one, and the run ended on the ledger's lost actor instead of
    the lost node). One call at a time: the calls of one caller run in the order made (the driver's `received`
    before its `close` and `state`)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, scheduling_strategy=here)(Ledger).remote()


def settle(ledger, poll_s: float = 0.05) -> dict[str, str] | None:
    """In the driver, once stopped: refuse new writes, wait until none is under way; the images written whose
    records the driver has not received, with their file or shard. None when a writer died mid-write."""
    import ray

    ray.get(ledger.close.remote())
    while True:
        under_way, stuck, written = ray.get(ledger.state.remote())
        if under_way == stuck:
            return None if stuck else written
        time.sleep(poll_s)


def read_back(written: dict[str, str], loc: Location, fmt: str) -> pa.Table:
    """The records of the images `written` (id -> its file or shard, from `settle`), read from the images."""
    units = [FORMATS[fmt].read_unit(loc, unit) for unit in sorted(set(written.values()))]
    records = [r for u in units for r in u.records or [] if r["id"] in written]
    return pa.Table.from_pylist(records, schema=SCHEMA).select(RECORD_SCHEMA.names)
