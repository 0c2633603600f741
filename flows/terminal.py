"""What `ifbatch run` shows on a terminal: its own lines, Prefect's flow-run lines, real warnings, and no noise.

Two things here: the temporary Prefect API a run starts when no server is configured (given the time its first
start needs, and said on one line), and a filter on the process's stderr for the one Ray line that no logger
level reaches (it comes from Ray's C++ core and is kept in the session's python-core-driver log).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

from ifbatch.models.quiet import drop_messages

# A fresh machine's temporary API first migrates a new database: over Prefect's default 20 s wait on 2 cores.
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
STARTUP_TIMEOUT_S = 300

# Ray Data's actor pools always pass their constructor arguments through the object store and restart dead actors,
# so Ray's core logs ray-project/ray#53727 as an error for every pool; nothing in it is the user's to act on.
STDERR_NOISE = (
    "has constructor arguments in the object store and max_restarts > 0",
    # the driver's core after a node left: it reconstructs what it can, and the run says what stopped it
    "Attempting to recover",
)
# The cluster's notices that Ray's driver prints on stdout, `(raylet) ...` (a node marked dead, a raylet's last
# log lines, task retries): after a node left, ~50 lines. They are in the Ray session's logs (raylet.out,
# gcs_server.out); the run says in its own line what they came to.
RAY_NOTICE = re.compile(r"^(\x1b\[\d+m)?\(raylet(, ip=[^)]*)?\)")


def prefect_api(say=print) -> str | None:
    """The Prefect API of this run: the configured server (PREFECT_API_URL), else a temporary local one started
    here with the time a first start needs; Prefect's client finds it and stops it at exit, after its logs are
    sent. Returns the temporary API's URL, or None when a server is configured."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None  # the user's server (or Prefect's own error when it has neither)
    timeout = max(int(os.environ.get(STARTUP_TIMEOUT_ENV) or 0), STARTUP_TIMEOUT_S)
    say(
        "ifbatch: starting a temporary Prefect API for this run (set PREFECT_API_URL to use a server; the first "
        "start on a machine creates its database, up to a minute) ...",
        end=" ",
        flush=True,
    )
    drop_messages("prefect", "Starting temporary server", "Stopping temporary server")  # said here instead
    server = SubprocessASGIServer()  # the instance Prefect's client looks for when no URL is set
    t0 = time.monotonic()
    # The API must outlive the run's own handling of a stop (the run still logs and records its state), and a stop
    # is often sent to the run's whole process group: a terminal's Ctrl-C or hangup, a batch scheduler's SIGTERM.
    # So it runs apart (a session of its own) and dies with this process whatever ends it. It stops when this
    # process exits (Prefect's atexit, with SIGTERM), or at a second Ctrl-C (tasks/stream/interrupt.py).
    with started_apart():
        server.start(timeout=timeout)
    say(f"ready in {time.monotonic() - t0:.0f} s")
    return server.api_url


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _apart_and_fate_shared() -> None:
    """In a helper process, before it runs its program: a session of its own, so that no signal sent to the run's
    process group or from its terminal reaches it; and SIGKILL when the run's process dies (Linux's parent-death
    signal, as Ray's own processes have), so that a `kill -9` of the run leaves nothing behind."""
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the run died before the line above: go with it
        os._exit(1)


@contextlib.contextmanager
def started_apart() -> Iterator[None]:
    """While it is open, the processes `subprocess.Popen` starts (Prefect's temporary API: its class takes no such
    option) run apart from the run's process group and die with the run (_apart_and_fate_shared)."""
    popen = subprocess.Popen

    class Apart(popen):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("preexec_fn", _apart_and_fate_shared)
            super().__init__(*args, **kwargs)

    subprocess.Popen = Apart  # type: ignore[misc]
    try:
        yield
    finally:
        subprocess.Popen = popen  # type: ignore[misc]


@contextlib.contextmanager
def on_terminal() -> Iterator[None]:
    """A run from a terminal: while images stream, the first Ctrl-C, SIGTERM or SIGHUP stops it gracefully (its
    finished images recorded, tasks/stream/interrupt.py), a second one at once, killing the processes the run
    started. Outside the stream SIGTERM and SIGHUP end the run like Ctrl-C (KeyboardInterrupt), not silently with
    the API left running."""
    from ifbatch.tasks.stream import interrupt

    interrupt.arm()
    # SIGINT too: a process started with it ignored (a shell's background job, a test runner's worker) would
    # otherwise ignore Ctrl-C until the stream starts, and the stream heeds it
    before = {s: signal.signal(s, interrupt.raise_interrupt) for s in interrupt.STOPS}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


DETAIL = {"ifbatch_detail": True}  # a log record's `extra`: for the dashboard's logs, not for the terminal


class _ForTheTerminal(logging.Filter):
    """What the terminal of a run leaves out (the dashboard's logs keep all of it): records marked DETAIL (a
    stopped run's reason and traceback: ifbatch's last line says it), and Prefect's lines on a task or the flow
    that did not complete (`Task run failed with state ...`, `Finished in state Failed(...)`: the same reason
    again, and an empty traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "ifbatch_detail", False):
            return False
        if not record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            return True
        msg = str(record.msg)
        ended = msg.startswith("Finished in state") and not msg.startswith("Finished in state Completed")
        return not (ended or msg.startswith("Task run failed with state"))


def quiet_prefect_console() -> None:
    """Filter the console handler of Prefect's logging (on the root logger) with _ForTheTerminal."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(
            isinstance(f, _ForTheTerminal) for f in handler.filters
        ):
            handler.addFilter(_ForTheTerminal())


class _WithoutRayNotices:
    """A stream that passes every write on but Ray's cluster notices (RAY_NOTICE): Ray prints each with one
    print(), so the notice and the newline that ends it are dropped."""

    def __init__(self, real):
        self.real = real
        self._dropped = False

    def write(self, text: str) -> int:
        dropped, self._dropped = self._dropped, False
        if dropped and text == "\n":
            return len(text)
        if RAY_NOTICE.match(text):
            self._dropped = True
            return len(text)
        return self.real.write(text)

    def __getattr__(self, name: str):
        return getattr(self.real, name)


@contextlib.contextmanager
def without_ray_notices() -> Iterator[None]:
    """sys.stdout without Ray's cluster notices while it is open."""
    real = sys.stdout
    sys.stdout = _WithoutRayNotices(real)
    try:
        yield
    finally:
        sys.stdout = real


@contextlib.contextmanager
def filtered_stderr(drop: tuple[str, ...] = STDERR_NOISE) -> Iterator[None]:
    """Route file descriptor 2 (C++ libraries write there directly) through a thread that drops lines holding any
    of `drop` and passes every other byte on."""
    sys.stderr.flush()
    real = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def pump() -> None:
        with os.fdopen(read, "rb") as src:
            for line in src:  # drained to the end whatever happens to the terminal: a writer must never block
                if not any(d.encode() in line for d in drop):
                    with contextlib.suppress(OSError):  # the terminal hung up (EIO)
                        os.write(real, line)

    thread = threading.Thread(target=pump, name="ifbatch-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)  # the pipe's last writer closes here unless a child process still holds it
        thread.join(timeout=2)
        if not thread.is_alive():  # else the pump still writes to it until that child exits
            os.close(real)
