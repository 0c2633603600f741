"""Shared fixtures: one tiny cascade per test session, built offline from a fixed seed."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the tests' private local cluster
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Ray starts its workers at nice 15; on a 2-core test machine that also runs a Prefect server and a browser, the
# stage actors then starve for minutes. The tests' own cluster gives them an even share.
os.environ.setdefault("RAY_worker_niceness", "0")

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

# Under pytest-xdist (`-n 2 --dist loadgroup`, pyproject's addopts) each group's tests run in one worker, in order.
# The session's Ray cluster is joined by the worker's own process (ray.init), and test_cluster_placement's cluster
# must be the first one its process joins: the three modules that use them are one group, in file order. Every other
# end-to-end module is a group of its own (its module-scoped servers start once).
SHARED_RAY = ("test_cluster_placement", "test_operate", "test_pipeline")
# The end-to-end modules go first under xdist, the longest first (about 9, 3, 3, 2, 2 and 1 minutes alone on 2
# cores): they start at once on the two workers, and the run and unit tests fill in beside and after them.
E2E_FIRST = (*SHARED_RAY, "test_multinode", "test_work_pool", "test_interrupts", "test_benchmarks", "test_first_run")


def _where(item) -> tuple[str, str]:
    """(layer, module name) of a test under tests/<layer>/."""
    parts = item.nodeid.split("::")[0].split("/")
    layer = parts[1] if len(parts) > 2 and parts[1] in LAYERS else ""
    return layer, parts[-1].removesuffix(".py")


def _group(item) -> str | None:
    layer, module = _where(item)
    if layer != "e2e":
        return None  # run and unit tests are dealt out one by one
    return "e2e-shared-ray" if module in SHARED_RAY else f"e2e-{module}"


def pytest_collection_modifyitems(config, items):
    """Serially: unit, then run, then end-to-end tests; within a layer, as collected. Under xdist: the end-to-end
    groups first (E2E_FIRST), then run, then unit tests."""
    for item in items:
        if group := _group(item):
            item.add_marker(pytest.mark.xdist_group(group))

    def serial(item) -> int:
        layer, _ = _where(item)
        return LAYERS.index(layer) if layer else len(LAYERS)

    def parallel(item) -> tuple[int, int]:
        layer, module = _where(item)
        if layer == "e2e":
            return 0, E2E_FIRST.index(module) if module in E2E_FIRST else len(E2E_FIRST)
        return 1, ("run", "unit").index(layer) if layer in ("run", "unit") else 2

    items.sort(key=parallel if os.environ.get("PYTEST_XDIST_WORKER") else serial)
