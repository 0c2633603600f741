"""The output lease: one run at a time writes into an output.

A run takes the lease (`<output>/.ifbatch-lease.json`: run id, host, pid, start, heartbeat) before it reads the
manifest, renews it every `ttl / 4` seconds, and removes it when it ends. A second run finds it held and refuses at
once, naming the holder, or with `wait` polls until it is free. A run that crashed stops renewing: its lease expires
after `ttl` seconds (at once when the holder's host is this one and its process is gone), and the next run takes
it over, so resume still works.

Taking and renewing are compare-and-swap: on S3 a conditional put (`If-None-Match: *` to create, `If-Match:
<etag>` to replace), locally a check-and-write under an flock. Of two runs that race for a free or expired lease,
exactly one gets it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from ..storage import Location, store_code

LEASE = ".ifbatch-lease.json"
TTL_S = 60.0


class LeaseHeld(RuntimeError):
    """Another run holds the output: the message names it."""


@dataclass(frozen=True)
class Holder:
    run_id: str
    host: str
    pid: int
    started: str
    heartbeat: float  # seconds since the epoch
    ttl_s: float

    def expired(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if now - self.heartbeat > self.ttl_s:
            return True
        return self.host == socket.gethostname() and not _alive(self.pid)

    def line(self) -> str:
        age = max(0.0, time.time() - self.heartbeat)
        return (
            f"run {self.run_id} on {self.host} (pid {self.pid}), started {self.started}, "
            f"renewed {age:.0f} s ago (it expires {self.ttl_s:.0f} s after its last renewal)"
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    def __init__(self, loc: Location, run_id: str, ttl_s: float = TTL_S):
        self.loc, self.run_id, self.ttl_s = loc, run_id, ttl_s
        self.path = loc.path(LEASE)
        self.started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.token: object = None  # what the store holds now, as we wrote it (etag or bytes)
        self.lost: Holder | None = None  # who took it from us, if anyone did
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the store's compare-and-swap ------------------------------------------------------------------------
    def _read(self) -> tuple[Holder | None, object]:
        """The holder and a token that changes whenever the lease does (None, None when there is none)."""
        fs = self.loc.fs
        fs.invalidate_cache(self.path)
        try:
            data = fs.cat_file(self.path)
            token = fs.info(self.path).get("ETag") if self.loc.protocol == "s3" else data
        except FileNotFoundError:
            return None, None
        try:
            return Holder(**json.loads(data)), token
        except (ValueError, TypeError):  # damaged: treat as expired
            return Holder("?", "?", 0, "?", 0.0, 0.0), token

    def _swap(self, token: object, holder: Holder) -> bool:
        """Write `holder` if the lease is still as `token` says (None: absent); whether it was written."""
        data = json.dumps(asdict(holder)).encode()
        if self.loc.protocol == "s3":
            cond = {"mode": "create"} if token is None else {"IfMatch": token}
            try:
                out = self.loc.fs.pipe_file(self.path, data, **cond)
            except OSError as e:
                if store_code(e) == "PreconditionFailed" or isinstance(e, FileExistsError):
                    return False
                raise
            self.token = (out or {}).get("ETag") or self.loc.fs.info(self.path).get("ETag")
            return True
        if self.loc.protocol != "file":  # no conditional write known: best effort
            self.loc.write_bytes(self.path, data)
            self.token = data
            return True
        os.makedirs(self.loc.root, exist_ok=True)
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with open(self.path, "rb") as f:
                    now = f.read()
            except FileNotFoundError:
                now = None
            if now != token:
                return False
            self.loc.write_bytes(self.path, data)
        self.token = data
        return True

    # -- taking, renewing, giving back -----------------------------------------------------------------------
    def _mine(self) -> Holder:
        return Holder(self.run_id, socket.gethostname(), os.getpid(), self.started, time.time(), self.ttl_s)

    def try_acquire(self) -> Holder | None:
        """Take the lease if it is free or expired; None when taken, else the live holder."""
        holder, token = self._read()
        if holder is not None and holder.run_id != self.run_id and not holder.expired():
            return holder
        if self._swap(token, self._mine()):
            return None
        holder, _ = self._read()  # another run won the race
        return holder or Holder("?", "?", 0, "?", time.time(), self.ttl_s)

    def acquire(self, wait: bool = False, wait_s: float = 24 * 3600, poll_s: float = 5.0, log=None) -> None:
        deadline = time.monotonic() + wait_s
        said = False
        while True:
            holder = self.try_acquire()
            if holder is None:
                return
            if not wait:
                raise LeaseHeld(
                    f"output {self.loc.uri(self.loc.root)!r} is in use by {holder.line()}; two runs into one output "
                    f"would make every image twice. Wait for it (--wait), or choose another output"
                )
            if time.monotonic() > deadline:
                raise LeaseHeld(f"waited {wait_s:.0f} s for output {self.loc.uri(self.loc.root)!r}: {holder.line()}")
            if log is not None and not said:
                log(f"output {self.loc.uri(self.loc.root)} is in use by {holder.line()}; waiting for it")
                said = True
            time.sleep(poll_s)

    def renew(self) -> bool:
        """Renew our lease; False (and `lost` set) when another run holds it now."""
        holder, token = self._read()
        if holder is not None and holder.run_id != self.run_id:
            self.lost = holder
            return False
        return self._swap(token, self._mine())

    def release(self) -> None:
        holder, _ = self._read()
        if holder is not None and holder.run_id == self.run_id:
            with contextlib.suppress(FileNotFoundError):
                self.loc.fs.rm_file(self.path)

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            with contextlib.suppress(Exception):  # a store hiccup: the next beat tries again, well within the ttl
                if not self.renew():
                    return

    @contextlib.contextmanager
    def held(self, wait: bool = False, log=None) -> Iterator[Lease]:
        """Acquire, renew in the background while the body runs, release after."""
        self.acquire(wait=wait, log=log)
        self._thread = threading.Thread(target=self._beat, name="ifbatch-lease", daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=10)
            self.release()
