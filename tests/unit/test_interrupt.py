"""The stream's side of a terminal Ctrl-C (tasks/stream/interrupt.py, pipeline._records): the first SIGINT or
SIGTERM lets the records already on their way out come (for the grace period on Ray; a stream computing here
finishes its step under way), then stops the stream with
Interrupted, and the signal handlers the process had are back after."""

from __future__ import annotations

import os
import signal
import threading
import time

import pyarrow as pa
import pytest

from ifbatch.tasks.stream import interrupt
from ifbatch.tasks.stream.pipeline import _records


class Stream:
    """A dataset whose record batches come every `every` seconds (what iter_batches yields)."""

    def __init__(self, n: int, every: float):
        self.n, self.every = n, every

    def __call__(self, stop: threading.Event):
        for i in range(self.n):
            time.sleep(self.every)
            yield pa.table({"id": [f"r{i}"]})


class Computing:
    """A stream that computes on its own thread (the local executor): each step takes `every` seconds, none starts
    once `stop` is set. `running` says whether a step is under way."""

    def __init__(self, every: float):
        self.every, self.running, self.steps = every, False, 0

    def __call__(self, stop: threading.Event):
        while not stop.is_set():
            self.running = True
            time.sleep(self.every)
            self.steps += 1
            self.running = False
            yield pa.table({"id": [f"r{self.steps}"]})


@pytest.fixture
def armed(monkeypatch):
    monkeypatch.setattr(interrupt, "_armed", True)
    monkeypatch.setattr(interrupt, "GRACE_S", 1.0)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in handlers.items():  # a stopped stream leaves "a second signal exits at once" behind
        signal.signal(s, h)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_first_signal_takes_what_comes_for_the_grace_period_then_stops(armed, signum):
    before = signal.getsignal(signum)
    threading.Timer(0.55, os.kill, (os.getpid(), signum)).start()
    got, t0 = [], time.monotonic()
    with pytest.raises(interrupt.Interrupted) as e:
        for records in _records(Stream(1000, 0.1), in_process=False):
            got.append(records)
    took = time.monotonic() - t0
    assert 1.4 < took < 2.5 and 10 <= len(got) <= 20  # ~5 before the signal, ~10 in the second after it
    assert e.value.exit_code == 128 + signum and str(e.value) == f"stopped by {signal.Signals(signum).name}"
    assert signal.getsignal(signum) is not before  # after a stop, a second signal still leaves at once


def test_a_stream_that_ends_in_the_grace_period_ends_normally_and_the_handlers_come_back(armed):
    threading.Timer(0.25, os.kill, (os.getpid(), signal.SIGINT)).start()
    assert len(list(_records(Stream(5, 0.1), in_process=False))) == 5  # every record came: nothing to stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert len(list(_records(Stream(3, 0.0), in_process=False))) == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_unarmed_the_stream_is_read_in_place(monkeypatch):
    monkeypatch.setattr(interrupt, "_armed", False)
    threads = threading.active_count()
    assert [r.column("id")[0].as_py() for r in _records(Stream(3, 0.0), in_process=False)] == ["r0", "r1", "r2"]
    assert threading.active_count() == threads  # no reader thread: a Prefect Cancel reaches the stream as before


def test_a_stream_computing_here_stops_at_once_and_keeps_the_step_under_way(armed):
    """The local executor's thread runs torch: the first signal stops it at once, with no grace period -- the step
    under way finishes and its records are taken, no step starts after it (a process that exits with a thread
    inside torch aborts: `terminate called without an active exception`)."""
    stream = Computing(every=0.7)
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()  # in the second step
    got, t0 = [], time.monotonic()
    with pytest.raises(interrupt.Interrupted):
        for records in _records(stream, in_process=True):
            got.append(records.column("id")[0].as_py())
    took = time.monotonic() - t0
    assert not stream.running and not [t for t in threading.enumerate() if t.name == "ifbatch-stream"]
    assert got == ["r1", "r2"] and stream.steps == 2  # the step under way at the signal is kept, none after it
    assert took < 1.4 + interrupt.GRACE_S / 2  # no grace period waited out
    time.sleep(1.0)
    assert stream.steps == 2  # nothing after the stop

    stream = Computing(every=0.3)  # a driver that leaves for its own reasons (a write failed) waits the same way
    records = _records(stream, in_process=True)
    next(records)
    records.close()
    assert not stream.running and not [t for t in threading.enumerate() if t.name == "ifbatch-stream"]
