"""The stream's side of a terminal Ctrl-C (tasks/stream/interrupt.py, pipeline._records): the first SIGINT or
SIGTERM stops the stream, takes every record of an image already written (on Ray: the writers settled, the records
in hand, then those read back from the images written whose records had not come; a stream computing here
finishes its step under way), with no grace period on a clock, then raises Interrupted, and the signal handlers the
process had are back after."""

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
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in handlers.items():  # a stopped stream leaves "a second signal exits at once" behind
        signal.signal(s, h)


class Settle:
    """What a Ray session's settler does, slowly (a busy machine): the writes under way end after `takes` seconds;
    the records of the images written that the driver was not told it took: the next two of the stream (in its
    queue, or never to come) and two that never came (w1, w2)."""

    def __init__(self, takes: float):
        self.takes, self.called, self.told = takes, 0, []

    def taken(self, records: pa.Table) -> None:
        self.told += records.column("id").to_pylist()

    def settle(self) -> pa.Table:
        self.called += 1
        time.sleep(self.takes)
        unheard = [i for i in (f"r{k}" for k in range(1000)) if i not in self.told][:2]  # in the queue, or to come
        return pa.table({"id": ["w1", *unheard, "w2"]})


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_first_signal_settles_the_writers_and_takes_every_written_image_once(armed, signum):
    before = signal.getsignal(signum)
    threading.Timer(0.55, os.kill, (os.getpid(), signum)).start()
    settle, got, t0 = Settle(takes=3.0), [], time.monotonic()
    with pytest.raises(interrupt.Interrupted) as e:
        for records in _records(Stream(1000, 0.1), in_process=False, settler=settle):
            got += records.column("id").to_pylist()
    took = time.monotonic() - t0
    assert settle.called == 1 and 3.5 < took < 4.5  # waited for the writers as long as they took, no clock
    assert len(got) == len(set(got)) and {"w1", "w2"} <= set(got)  # every image written, each once
    stream = [i for i in got if i.startswith("r")]
    assert stream == [f"r{i}" for i in range(len(stream))] and 5 <= len(stream) <= 8  # in order; none after
    assert e.value.settled and e.value.exit_code == 128 + signum
    assert str(e.value) == f"stopped by {signal.Signals(signum).name}"
    assert signal.getsignal(signum) is not before  # after a stop, a second signal still leaves at once


class Unsettled:
    def taken(self, records: pa.Table) -> None:
        pass

    def settle(self) -> None:
        return None


def test_a_stream_that_cannot_settle_says_so_and_the_handlers_come_back_after_a_normal_end(armed):
    threading.Timer(0.25, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(interrupt.Interrupted) as e:  # a writer gone mid-write: the next run takes over what it left
        list(_records(Stream(1000, 0.1), in_process=False, settler=Unsettled()))
    assert not e.value.settled
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
    assert took < 1.9  # no grace period waited out
    time.sleep(1.0)
    assert stream.steps == 2  # nothing after the stop

    stream = Computing(every=0.3)  # a driver that leaves for its own reasons (a write failed) waits the same way
    records = _records(stream, in_process=True)
    next(records)
    records.close()
    assert not stream.running and not [t for t in threading.enumerate() if t.name == "ifbatch-stream"]
