"""Start or join a Ray cluster for a run: a private local one by default, `ray.address` (or RAY_ADDRESS) for a
cluster."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator

from ifbatch.configs.schema import RayConfig
from ifbatch.models.quiet import VERBOSE_ENV, verbose

from .. import interrupt


def quiet_ray_data() -> None:
    """Ray Data prints its execution plan, start and finish lines on the console, and an operator's failure as
    tracebacks (a lost node: two chained, ~100 lines); all of it stays in its own log file (the Ray session's
    logs/ray-data.log) and the run says what stopped it in one line. `IFBATCH_VERBOSE=1` keeps them all."""
    import ray.data  # noqa: F401  (configures the "ray.data" logger)

    if verbose():
        return
    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(logging.CRITICAL + 1)


REACH_S = 15.0  # a cluster address that does not answer within this is refused (exit 2), not waited on


class ClusterUnreachable(ConnectionError):
    """The Ray cluster a run is to join does not answer: the message names the address as given and where it
    came from."""


# HTTP/2's connection preface and an empty SETTINGS frame (RFC 9113, 3.4): a gRPC server -- Ray's GCS and its
# Client server are -- answers with a SETTINGS frame of its own at once; a head that is hung (stopped, swapping,
# deadlocked) still has its port accept connections (the kernel does that) but says nothing.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
H2_SETTINGS = 4  # the frame type a server's first frame must have


def reach(address: str, origin: str, timeout_s: float = REACH_S) -> None:
    """Raise ClusterUnreachable unless the cluster at `address` answers within `timeout_s`: its GCS (host:port),
    its Ray Client server (ray://host:port), or for `auto` the cluster a `ray start` on this machine recorded,
    accepts a connection and speaks gRPC's HTTP/2 (its first frame, SETTINGS). Ray itself retries a dead address
    for minutes, then for ever, saying only `Failed to connect to GCS` (with an address other than the one
    given), and waits for ever on a head that accepts connections and does not answer."""
    import socket

    from ray._private.services import canonicalize_bootstrap_address

    given = f"{address!r} ({origin})"
    target = address.removeprefix("ray://")
    if address == "auto":
        try:
            target = canonicalize_bootstrap_address("auto") or ""
        except Exception:
            target = ""
        if not target:
            raise ClusterUnreachable(
                f"Ray cluster {given}: no cluster was started on this machine (`ray start --head`); give its address"
            )
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterUnreachable(f"Ray cluster {given}: expected host:port, ray://host:port or auto")
    seen = f" (its address on this machine: {target})" if target != address.removeprefix("ray://") else ""
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
            sock.sendall(H2_PREFACE)
            first = b""
            while len(first) < 9:  # a frame's header
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                got = sock.recv(9 - len(first))
                if not got:
                    break
                first += got
    except TimeoutError:
        raise ClusterUnreachable(
            f"Ray cluster {given} accepted the connection but did not answer in {timeout_s:.0f} s{seen}: is the "
            f"head node hung (stopped, swapping, overloaded)? Check it (`ray status` on the head), or leave the "
            f"address unset to run on a private local cluster"
        ) from None
    except OSError as e:
        raise ClusterUnreachable(
            f"Ray cluster {given} does not answer{seen}: {type(e).__name__}: {e}. Is the head node up? Check the "
            f"address, or leave it unset to run on a private local cluster"
        ) from None
    if len(first) < 9 or first[3] != H2_SETTINGS:
        raise ClusterUnreachable(
            f"Ray cluster {given}: what answers there is not a Ray cluster (no gRPC){seen}; the GCS port (6379 by "
            f"default) or the Ray Client port (ray://, 10001) is expected"
        )


def address_origin(rc: RayConfig) -> str:
    return "--ray-address / ray.address" if rc.address else "RAY_ADDRESS"


def join_address(rc: RayConfig) -> str | None:
    """The cluster a run joins: ray.address (--ray-address), else RAY_ADDRESS when the environment sets it (as
    `ray job submit` does for the job's driver), else none: the run starts a private local cluster."""
    return rc.address or os.environ.get("RAY_ADDRESS") or None


@contextlib.contextmanager
def ray_session(rc: RayConfig) -> Iterator[None]:
    """Reuse a Ray session already initialised by the caller (tests, notebooks); else start one and stop it after."""
    import ray

    quiet_ray_data()
    if ray.is_initialized():
        yield
        return
    kwargs: dict = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=True)
    if verbose():  # the stage actors keep every library line too
        kwargs["runtime_env"] = {"env_vars": {VERBOSE_ENV: os.environ[VERBOSE_ENV]}}
    address = join_address(rc)
    if address:
        reach(address, address_origin(rc))
        kwargs["address"] = address
    else:
        # "local": a private cluster of this run's own. Plain ray.init() would join the cluster whose address a
        # `ray start` left in /tmp/ray (and wait forever when that cluster has died).
        kwargs["address"] = "local"
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster needs no token
        kwargs.update(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus)
        if rc.object_store_gb:
            kwargs["object_store_memory"] = int(rc.object_store_gb * 2**30)
    # A private cluster starts with SIGTERM and SIGHUP blocked (interrupt.blocked_in_children): a batch scheduler
    # stops a terminal run, and a Prefect worker or `ifbatch serve` cancels a deployment run, with SIGTERM to the
    # run's whole process group, and a lost SSH connection sends SIGHUP. Unspared, the cluster died with it and Ray
    # terminated the driver ("The connection to the plasma store is failed") or the driver waited on a dead GCS,
    # before it recorded what it made. Spared, the driver's handler still reaches its cluster; the cluster goes
    # with the run (Ray ties its processes to this one, and `ray.shutdown` kills what outlasts SIGTERM after 1 s).
    # SIGINT Ray blocks in them itself. Not a cluster joined, which is not this process's to keep.
    spare = () if address else (signal.SIGTERM, signal.SIGHUP)
    with _sigterm_kept(), interrupt.blocked_in_children(*spare):
        ray.init(**kwargs)
    try:
        yield
    finally:
        if spare:
            _shutdown_private()
        else:
            ray.shutdown()


def _shutdown_private() -> None:
    """`ray.shutdown` stops a cluster's processes one by one with SIGTERM, giving each 1 s before SIGKILL. This run's
    private cluster blocks SIGTERM (above): it waited out every second, ~5 s at the end of every run (a Ctrl-C then
    took over 10 s on a busy machine). Its processes are killed at once -- nothing of the run is left in them -- and
    so is every process they started that outlives them (Ray's agents, workers)."""
    import psutil
    import ray

    node = ray._private.worker._global_node  # (Ray 2.60: what ray.shutdown stops)
    if node is None:
        ray.shutdown()
        return
    cluster = []
    for infos in node.all_processes.values():
        for info in infos:
            with contextlib.suppress(psutil.Error):
                top = psutil.Process(info.process.pid)
                cluster += [top, *top.children(recursive=True)]
    kill = node.kill_all_processes
    node.kill_all_processes = lambda **kw: kill(**{**kw, "allow_graceful": False})
    ray.shutdown()
    for p in cluster:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(cluster, timeout=5)


@contextlib.contextmanager
def _sigterm_kept() -> Iterator[None]:
    """Keep the SIGTERM handler the process had before `ray.init`, which installs its own (`sys.exit`). In a flow
    run that handler is Prefect's: a Cancel from the dashboard reaches the run as SIGTERM, which Prefect turns into
    a cancellation (state Cancelled) only while its own handler is in place. The run's `finally` blocks stop the
    stream, record what was done and shut Ray down either way."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and before is not None:
            signal.signal(signal.SIGTERM, before)
