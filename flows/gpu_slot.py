"""Runs that share GPUs queue: every deployment run holds a slot of one Prefect global concurrency limit per cluster
(`ifbatch-gpus-<host>`) from before Ray starts until its records are written. The limit is created at size
`ray.runs_at_once` (1) the first time a run or `ifbatch serve` needs it; an operator may resize it on the dashboard's
Concurrency page. A run that waits says so in its log.

A run whose process dies (SIGKILL, a lost machine) cannot give its slot back: the slot's lease, renewed every
3/4 of LEASE_S while the run lives, lapses and the Prefect server's repossessor service frees it, LEASE_S plus up
to 15 s later. Only a Prefect server runs that service, not the temporary API `ifbatch run` starts for itself when
PREFECT_API_URL is unset (it shares one database on the machine: a killed run's slot would be held there for good).
So the slot is taken by deployment runs only, which always have a server; `ifbatch run` from a terminal does not
queue."""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlparse

from ifbatch.configs.schema import RayConfig
from ifbatch.tasks.stream.ray.session import join_address

LOOPBACK = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
LEASE_S = 120.0


def slot_name(rc: RayConfig) -> str:
    """The limit of the GPUs a run uses: named by the host of the cluster's address (its head node); runs that
    start their own local cluster, or join one at a loopback address or 'auto', use this machine's GPUs."""
    if rc.gpu_slot:
        return rc.gpu_slot
    host, address = None, join_address(rc)
    if address and address != "auto":
        addr = address if "://" in address else f"ray://{address}"
        host = urlparse(addr).hostname
    if not host or host in LOOPBACK:
        host = socket.gethostname()
    return "ifbatch-gpus-" + re.sub(r"[^A-Za-z0-9._-]", "-", host)


def ensure_limit(name: str, size: int) -> bool:
    """Create the global concurrency limit `name` at `size` slots unless it exists; True when this call made it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as c:
        try:
            c.read_global_concurrency_limit_by_name(name)
            return False
        except ObjectNotFound:
            pass
        try:
            c.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=size))
            return True
        except ObjectAlreadyExists:  # another run made it meanwhile
            return False


@contextlib.contextmanager
def gpu_slot(
    rc: RayConfig, log, flow_run_id: str | None = None, deployment_id: str | None = None
) -> Iterator[dict | None]:
    """For a deployment run, hold one slot of the cluster's limit for the body; yields what the run record keeps
    about it (None for a run that is not a deployment's)."""
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.concurrency.sync import concurrency

    if deployment_id is None:
        yield None
        return
    name = slot_name(rc)
    if ensure_limit(name, rc.runs_at_once):
        log.info("created the Prefect global concurrency limit %s (%d run at a time)", name, rc.runs_at_once)
    holder = ConcurrencyLeaseHolder(type="flow_run", id=flow_run_id) if flow_run_id else None
    log.info("taking a slot of %s (runs on the same GPUs queue here)", name)
    t0 = time.monotonic()
    with concurrency(
        name, occupy=1, strict=True, holder=holder, lease_duration=LEASE_S, raise_on_lease_renewal_failure=False
    ):
        waited = time.monotonic() - t0
        if waited >= 1.0:
            log.info("got a slot of %s after waiting %.0f s", name, waited)
        yield {"name": name, "waited_seconds": round(waited, 3), "acquired_at": dt.datetime.now(dt.UTC).isoformat()}
