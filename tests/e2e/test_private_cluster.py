"""A run's private local Ray cluster outlasts a SIGTERM sent to the run's whole process group -- how a Prefect worker
and `ifbatch serve` cancel a run -- so that the run, handling it, still reaches its object store to record what it
made (tasks/stream/ray/session.py). The whole path, a worker cancelling a run: tests/e2e/test_work_pool.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from ..helpers import wait_gone

pytestmark = pytest.mark.slow

RUN = """
import signal, sys, time
import numpy as np, ray
from ifbatch.configs.schema import RayConfig
from ifbatch.tasks.stream.ray.session import ray_session

@ray.remote
def total(x):
    return float(x.sum())

def on_term(signum, frame):  # what a cancelled run does: stops its stream (a while), frees its placement groups
    time.sleep(2)  # (the cluster's control store), takes the blocks still in the object store, records them
    ray.util.remove_placement_group(group)
    ref = ray.put(np.ones(1_000_000))
    open(sys.argv[1], "w").write(str(ray.get(total.remote(ref))))
    raise SystemExit(0)

with ray_session(RayConfig(num_cpus=2, num_gpus=0)):
    signal.signal(signal.SIGTERM, on_term)
    group = ray.util.placement_group([{"CPU": 0.5}])
    ray.get(group.ready())
    ray.get(total.remote(np.ones(3)))
    print("ready", flush=True)
    while True:
        time.sleep(0.1)
"""


def test_a_private_cluster_outlasts_the_process_groups_sigterm_and_goes_with_the_run(tmp_path):
    record = tmp_path / "record"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-c", RUN, str(record)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while proc.stdout.readline().strip() != "ready":  # (readline returns "" once the process has ended)
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        os.killpg(proc.pid, signal.SIGTERM)  # the run and every process it started, as a worker's Cancel does
        _, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    assert record.read_text() == "1000000.0"  # the handler reached the cluster's object store
    wait_gone(proc.pid, timeout=30)  # the run's cluster went with it
