"""The work-pool path, as an operator sets it up: `prefect work-pool create --type process`, `prefect deploy --all`
from the repository's prefect.yaml, `prefect worker start`. A run triggered as the dashboard does runs on the worker
and starts a local Ray cluster of its own; Cancel stops it and that cluster goes with it; a rerun on the pool (on the
local executor: resume is the run engine's) makes the rest."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ..helpers import ROOT, write_table
from ..prefect_helpers import api, cancel, manifest_ids, run_records, start, wait_final, wait_for_records
from ..services import PrefectServer, stop_group

pytestmark = pytest.mark.slow

PREFECT = str(Path(sys.executable).with_name("prefect"))


@pytest.fixture(scope="module")
def pool_server(tmp_path_factory):
    srv = PrefectServer(tmp_path_factory.mktemp("prefect-pool-home")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def worker(pool_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("worker")
    env = {
        **os.environ,
        **pool_server.env(),
        "IFBATCH_CHECKOUT": str(ROOT),  # prefect.yaml's pull step: where the worker finds the code
        "IFBATCH_SPILL_DIR": str(folder / "spill"),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
    }
    env.pop("RAY_ADDRESS", None)
    for argv in (["work-pool", "create", "ifbatch", "--type", "process"], ["deploy", "--all", "--no-prompt"]):
        done = subprocess.run([PREFECT, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"prefect {' '.join(argv)}: {done.stdout}\n{done.stderr}"
    log = open(folder / "worker.log", "wb")
    proc = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "ifbatch"],
        cwd=folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    proc.log_path = Path(log.name)
    yield proc
    stop_group(proc, grace=30)
    log.close()


def raylets(worker: subprocess.Popen) -> set[psutil.Process]:
    """The raylet processes (one per Ray node) the worker's flow runs started: among its descendants (other tests'
    clusters may run beside it)."""
    return {p for p in psutil.Process(worker.pid).children(recursive=True) if p.name() == "raylet"}


def running(processes: set[psutil.Process]) -> bool:
    def alive(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return any(alive(p) for p in processes)


def test_a_worker_runs_cancels_and_resumes_a_run_with_its_own_ray(pool_server, worker, tmp_path, tiny_dir):
    prompts = write_table(tmp_path / "p.parquet", {"prompt": [f"a photo of a fox number {i}" for i in range(10)]})
    out = str(tmp_path / "out")
    batches = [f"{s}.batch_size=2" for s in ("text_encoder", "stage_1", "stage_2", "stage_3")]
    sets = [f"tiny.dir={tiny_dir}", "output.manifest_part_rows=2", "ray.num_cpus=2", *batches]
    params = {"prompts": prompts, "output": out, "preset": "tiny", "overrides": sets}  # no ray_address: local Ray
    with api(pool_server):
        run = start(params, timeout=0)
        wait_for_records(out, run, timeout=600)
        own = raylets(worker)
        assert own, "the run started no local Ray cluster"
        cancel(run.id)
        final = wait_final(run.id, timeout=180)
        assert final.state.is_cancelled(), final.state
        assert final.work_queue_name and final.deployment_id  # it ran on the pool, from the deployment
        deadline = time.monotonic() + 60
        while running(own) and time.monotonic() < deadline:
            time.sleep(1)
        assert not running(own), "the cancelled run's local Ray cluster is still running"
        done = manifest_ids(out)
        assert 0 < len(done) < 10
        # The worker's SIGTERM goes to the run's whole process group: the cluster's processes, started with SIGTERM
        # blocked, outlast it, and the run records what it made (stream/ray/session._spared_from_group_sigterm).
        (record,) = run_records(out)
        assert record["status"] == "cancelled" and record["counts"]["done"] == len(done), record

        # the rerun on the pool too; resume is the run engine's whatever runs the stream: it runs in the flow's process
        again = start({**params, "overrides": [*sets, "executor=local"]}, timeout=900)
    assert again.state.is_completed(), again.state.message
    ids = manifest_ids(out)
    assert len(ids) == 10 == len(set(ids))
    assert run_records(out)[-1]["counts"]["skipped"] == len(done)
