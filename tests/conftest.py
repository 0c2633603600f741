"""Shared fixtures: one tiny cascade per test session, built offline from a fixed seed."""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the tests' private local cluster
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Ray starts its workers at nice 15; on a 2-core test machine that also runs a Prefect server and a browser, the
# stage actors then starve for minutes. The tests' own cluster gives them an even share.
os.environ.setdefault("RAY_worker_niceness", "0")
# Under pytest-xdist the workers share the machine's cores, and so does every run process a test starts. Torch's
# intra-op pool takes one thread per core in each of them by default; on 2 cores with 2 workers those threads spun
# against each other: two run-layer modules side by side took 191 s and 362 CPU-seconds, 70 s and 106 with one
# thread each (docs/development.md). Each worker gets its share of the cores, as Ray gives each actor its CPUs.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # (macOS)
    _share = _cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))

import pytest  # noqa: E402

from ifbatch.configs import load_config  # noqa: E402
from ifbatch.models.tiny import build_tiny_cascade  # noqa: E402

from .services import SeaweedS3  # noqa: E402

BUCKET = "ifbatch-test"

TINY_SEED = 0


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_tiny_cascade(tmp_path_factory.mktemp("models") / "tiny-cascade", seed=TINY_SEED)


@pytest.fixture(scope="session")
def tiny_cfg(tiny_dir):
    return load_config("tiny", [f"tiny.dir={tiny_dir}"])


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server for the session; its endpoint and (dummy) credentials go into the environment before Ray
    starts, so that the driver, the Ray workers and CLI subprocesses all reach it the same way."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start().use(BUCKET, "ifbatch-test", "ifbatch-test-secret")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_server, tmp_path_factory):
    """One local Ray cluster for the session, with 1 fake GPU: every run plans for it (plan.mode auto, one actor
    of each stage sharing the GPU, as on a one-GPU machine). Plans over several GPUs and nodes: test_multinode."""
    import ray

    ray.init(
        address="local",  # never a cluster another test (cluster_utils) left in /tmp/ray
        num_cpus=2,
        num_gpus=1,
        object_store_memory=1 << 30,
        include_dashboard=False,
        logging_level="WARNING",
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_api():
    """Prefect's test harness: a real, temporary API server and database for the session."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


LAYERS = ("unit", "run", "e2e")  # the order a serial run takes them: the fastest, most specific failures first

# Under pytest-xdist (`-n 2 --dist loadfile`, pyproject's addopts) each module runs in one worker, its module-scoped
# servers started once. The end-to-end modules are dealt out first (about 0.6, 5, 2.6, 2, 1.5, 3.2, 1.4 and 1 minutes
# in a whole run of the suite on 2 cores, 2026-12-07), so that they start at once on the two workers and the run and
# unit tests fill in beside and after them. test_cluster_placement leads: its cluster must be the first one
# its process joins (a process is the driver of one cluster at a time; the session's cluster stays joined).
E2E_FIRST = (
    "test_cluster_placement",
    "test_operate",
    "test_pipeline",
    "test_multinode",
    "test_work_pool",
    "test_interrupts",
    "test_benchmarks",
    "test_first_run",
)


# Then the run layer's modules, the longest first (about 210, 70, 55, 35, 30 and 25 s beside the end-to-end tests),
# so that the suite ends with short modules on both workers instead of one worker running the run layer's longest
# while the other has finished (seen: ~2 minutes of one worker idle at the end).
RUN_FIRST = ("test_run", "test_parity", "test_verify", "test_best_of_k", "test_models", "test_changed_settings")


def _where(item) -> tuple[str, str]:
    """(layer, module name) of a test under tests/<layer>/."""
    return (item.path.parent.name if item.path.parent.name in LAYERS else ""), item.path.stem


def pytest_collection_modifyitems(config, items):
    """Serially: unit, then run, then end-to-end tests; within a layer, as collected. Under xdist: the end-to-end
    modules first (E2E_FIRST), then the run layer's (RUN_FIRST), then unit tests (sorting is stable: a module's
    tests stay in their order)."""

    def serial(item) -> int:
        layer, _ = _where(item)
        return LAYERS.index(layer) if layer else len(LAYERS)

    def parallel(item) -> tuple[int, int]:
        layer, module = _where(item)
        if layer == "e2e":
            return 0, E2E_FIRST.index(module) if module in E2E_FIRST else len(E2E_FIRST)
        if layer == "run":
            return 1, RUN_FIRST.index(module) if module in RUN_FIRST else len(RUN_FIRST)
        return 2, 0

    items.sort(key=parallel if os.environ.get("PYTEST_XDIST_WORKER") else serial)


@pytest.fixture(autouse=True)
def machine_share(request):
    """Under xdist, a test marked `alone` (one that times the product -- a stop within seconds -- or that would
    run over 3 minutes beside another Ray test) runs with no other test beside it; the others share the machine.
    A shared and an exclusive flock on one file, and a turnstile that a waiting `alone` test holds, so that the
    other worker's next tests queue behind it rather than keep it waiting. An `alone` test may share() the machine
    for what it no longer times (the Ctrl-C test's rerun)."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:  # a serial run: every test is alone
        yield Share()
        return
    folder = Path(tempfile.gettempdir())
    alone = request.node.get_closest_marker("alone") is not None
    with (
        open(folder / f"ifbatch-tests-{run}.turnstile", "a") as gate,
        open(folder / f"ifbatch-tests-{run}.lock", "a") as lock,
    ):
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield Share(lock if alone else None)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Share:
    """What an `alone` test holds: share() when the rest of it times nothing (the other worker's tests may then run
    beside it)."""

    def __init__(self, lock=None):
        self.lock = lock

    def share(self) -> None:
        if self.lock is not None:
            fcntl.flock(self.lock, fcntl.LOCK_SH)
            self.lock = None
