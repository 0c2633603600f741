"""What `ifbatch run` shows on a terminal: its own lines, Prefect's flow-run lines, real warnings, and no noise.

Two things here: the temporary Prefect API a run starts when no server is configured (given the time its first
start needs, and said on one line), and a filter on the process's stderr for the one Ray line that no logger
level reaches (it comes from Ray's C++ core and is kept in the session's python-core-driver log).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

from ifbatch.models.quiet import drop_messages
from ifbatch.tasks.stream.interrupt import blocked_in_children

# A fresh machine's temporary API first migrates a new database: over Prefect's default 20 s wait on 2 cores.
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
STARTUP_TIMEOUT_S = 300

# Ray Data's actor pools always pass their constructor arguments through the object store and restart dead actors,
# so Ray's core logs ray-project/ray#53727 as an error for every pool; nothing in it is the user's to act on.
STDERR_NOISE = ("has constructor arguments in the object store and max_restarts > 0",)


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
    # Started with SIGINT blocked, which its process inherits: a Ctrl-C reaches every process of the terminal's
    # group, and the API must outlive the run's own handling of it (the run still logs and records its state).
    # It stops when this process exits (Prefect's atexit), or at a second Ctrl-C (tasks/stream/interrupt.py).
    with blocked_in_children(signal.SIGINT):
        server.start(timeout=timeout)
    say(f"ready in {time.monotonic() - t0:.0f} s")
    return server.api_url


@contextlib.contextmanager
def on_terminal() -> Iterator[None]:
    """A run from a terminal: while images stream, the first Ctrl-C or SIGTERM stops it gracefully (its finished
    images recorded, tasks/stream/interrupt.py), a second one at once, killing the processes the run started.
    Outside the stream SIGTERM ends the run like Ctrl-C (KeyboardInterrupt), not silently with the API left
    running."""
    from ifbatch.tasks.stream import interrupt

    interrupt.arm()
    before = signal.signal(signal.SIGTERM, interrupt.raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


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
            for line in src:
                if not any(d.encode() in line for d in drop):
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
