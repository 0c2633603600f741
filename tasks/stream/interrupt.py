"""A terminal user's Ctrl-C (SIGINT), a `kill` or a batch scheduler's stop (SIGTERM), or a hangup (SIGHUP: the SSH
connection or the terminal went) while images stream: the first stops the run gracefully, the second at once.

The first signal sets a switch; the stream (pipeline.run_pipeline) stops, takes the records of every image already
written (ledger.py: no grace period to guess), writes them to the manifest, and raises `Interrupted`, so the run
records what it finished, writes its run record and frees its output like any stopped run. A second signal kills
every process this one started (the temporary Prefect API, a local Ray cluster) and leaves at once.

Only a run started from a terminal arms this (`arm()`, by `ifbatch run`): in a run from a Prefect deployment SIGTERM
is Prefect's Cancel, and Prefect's own handler stays in place.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

# The signals that stop a terminal run: what a terminal, `kill`, a batch scheduler (Slurm's scancel, systemd) or a
# lost SSH connection send, to the run's process or to its whole process group.
STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_armed = False


def exit_status(signum: int) -> int:
    """The exit status of a process a signal stopped, by the shell's convention: 130 for Ctrl-C, 143 for SIGTERM,
    129 for SIGHUP."""
    return 128 + signum


class Interrupted(Exception):
    """The user stopped the run (Ctrl-C, SIGTERM or SIGHUP on a terminal run)."""

    def __init__(self, signum: int, settled: bool = True, late: int = 0):
        self.signum = signum
        self.settled = settled  # every image the run wrote is recorded (else the next run takes them over)
        self.late = late  # of those, recorded from the images themselves (their records had not come)
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return exit_status(self.signum)


class SignalInterrupt(KeyboardInterrupt):
    """SIGTERM or SIGHUP outside the stream, raised as Ctrl-C is (KeyboardInterrupt), naming its signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signal = signum


def raise_interrupt(signum: int, frame) -> None:
    hung_up(signum)
    raise SignalInterrupt(signum)


def hung_up(signum: int) -> None:
    """After SIGHUP the terminal is gone, and a write to it fails (EIO): the run's lines go to /dev/null from here
    on, as under nohup (its run record, manifest and log files say what it did)."""
    if signum != signal.SIGHUP:
        return
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            os.dup2(null, fd)
        os.close(null)


@contextlib.contextmanager
def blocked_in_children(*signums: int) -> Iterator[None]:
    """Block `signums` in this thread while the block starts processes: they inherit the mask across exec and
    never see those signals (what is sent to the whole process group reaches this process only)."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, set(signums))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def arm() -> None:
    """Make the stream stop gracefully on SIGINT / SIGTERM / SIGHUP in this process (a terminal run)."""
    global _armed
    _armed = True


def armed() -> bool:
    return _armed


class Switch:
    """Set by the first signal; the stream checks it between records."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum = 0

    def set(self, signum: int) -> None:
        self.signum = signum
        self.event.set()

    @property
    def on(self) -> bool:
        return self.event.is_set()


def hard_exit(signum: int) -> None:
    """The second signal: no more waiting. Every process this one started (the temporary Prefect API, the local
    Ray cluster and the agents its raylet started) is killed first, so that none is left behind."""
    import psutil

    with contextlib.suppress(Exception):
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
    os._exit(exit_status(signum))


@contextlib.contextmanager
def stop_switch() -> Iterator[Switch]:
    """While the stream runs: when armed (and on the main thread), SIGINT, SIGTERM and SIGHUP set the switch, a second
    one exits at once; the handlers before are put back after."""
    switch = Switch()
    if not _armed or threading.current_thread() is not threading.main_thread():
        yield switch
        return

    def handle(signum, frame) -> None:
        hung_up(signum)
        if switch.on:
            hard_exit(signum)
        switch.set(signum)

    before = {s: signal.getsignal(s) for s in STOPS}
    for s in before:
        signal.signal(s, handle)
    try:
        yield switch
    finally:
        for s, h in before.items():
            signal.signal(s, h)
        if switch.on:  # a second signal after the stream ended still leaves at once
            for s in STOPS:
                signal.signal(s, lambda s, f: (hung_up(s), hard_exit(s)))
