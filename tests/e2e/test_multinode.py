"""A run on a real multi-node Ray cluster on this machine, of the shape users have: a head without GPUs and uneven
worker nodes of 2 and 1 fake GPUs (ray.cluster_utils.Cluster: each node its own raylet). `ifbatch run --ray-address`
plans for the cluster's 3 GPUs and every GPU holds one actor of each diffusion stage; the 2-GPU worker removed
mid-run ends the run with a clear reason (or the run completes), and a rerun completes on the GPU that remains
with every image exactly once. Nodes of 4 and 8 GPUs: the same placement code reserves 4 + 4 + 2 on a real
cluster with a task in every bundle (test_cluster_placement.py) and every shape is checked as Ray places it
(tests/unit/test_cluster_shapes.py). A whole run on 4 + 4 + 2 took 6 minutes on 2 cores, 4 + 2 over 3 minutes
(each GPU's actors load the models): over the suite's 3 minutes a test."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from ifbatch.configs.schema import CASCADE

from ..helpers import SMALL, manifest_rows, write_table
from ..services import fake_gpu_cluster

# Alone: beside test_operate it took 148-163 s and test_operate's Cancel test 213 s instead of 96 s (a whole
# fresh-clone suite was no shorter: 22 min 48 s)
pytestmark = [pytest.mark.slow, pytest.mark.alone]
SHAPE = (2, 1)  # fake GPUs per worker node


@pytest.fixture(scope="module")
def cluster():
    with fake_gpu_cluster(SHAPE, quick_node_death=True) as (c, workers):
        yield c, workers


def run_cli(prompts: str, out: str, address: str, env: dict, *extra: str, wait: bool = True):
    cmd = [str(Path(sys.executable).with_name("ifbatch")), "run", prompts, out, "--ray-address", address]
    cmd += ["--no-progress", *extra]
    env = {**os.environ, **env}
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def ok_records(out: str) -> list[str]:
    """The ids of every `ok` record in every manifest part, duplicates included (read_manifest keeps one)."""
    import pyarrow.parquet as pq

    from ifbatch.tasks.outputs.manifest import part_paths
    from ifbatch.tasks.storage import locate

    ids = []
    for path in part_paths(locate(out)):
        t = pq.read_table(path, columns=["id", "status"]).to_pylist()
        ids += [r["id"] for r in t if r["status"] == "ok"]
    return sorted(ids)


def placements(out: str) -> dict[tuple, set]:
    """(node, GPU ids) -> {(stage, actor)} over the rows recorded so far."""
    held = defaultdict(set)
    for r in manifest_rows(out):
        for stage, where in json.loads(r["placement"]).items():
            held[(where["node"], tuple(where["gpus"]))].add((stage, where["actor"]))
    return held


def planned_groups(address: str) -> tuple[dict[str, Counter], list[str]]:
    """{stage: Counter(node -> bundles)} of the ifbatch placement groups alive on the cluster now, and the nodes of
    the writers' ledger actors alive (read by a process of its own: this one may be the driver of another cluster
    already)."""
    code = (
        "import json, ray\n"
        "from ray.util import placement_group_table\n"
        "from ray._private.state import actors\n"  # (Ray's state API needs the dashboard, which the tests leave off)
        f"ray.init(address={address!r}, logging_level='ERROR')\n"
        "live = [a for a in actors().values() if a['ActorClassName'] == 'Ledger' and a['State'] == 'ALIVE']\n"
        "ledgers = [a['Address']['NodeID'] for a in live]\n"
        "print(json.dumps([list(placement_group_table().values()), ledgers]))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    groups, ledgers = json.loads(res.stdout.strip().splitlines()[-1])
    out = {}
    for pg in groups:
        if pg["name"].startswith("ifbatch-") and pg["state"] == "CREATED":
            out[pg["name"].removeprefix("ifbatch-")] = Counter(n[:12] for n in pg["bundles_to_node_id"].values())
    return out, [n[:12] for n in ledgers]


def test_plans_for_every_gpu_of_uneven_nodes_and_survives_losing_one(cluster, tiny_dir, prefect_api, tmp_path):
    c, workers = cluster
    env = {"PREFECT_API_URL": prefect_api}
    tiny = ["--set", f"tiny.dir={tiny_dir}", "--set", "scorer.source=null"]  # placement, not scores, is tested
    gpus_of = {w.node_id[:12]: g for w, g in zip(workers, SHAPE, strict=True)}
    images = 24  # the first run is still at work when both workers' records are in (4-8 of them), the rerun short
    prompts = write_table(tmp_path / "p.parquet", {"prompt": [f"{p} number {i}" for i in range(4) for p in SMALL]})
    out = str(tmp_path / "out")
    flush = ["--set", "output.manifest_flush_seconds=1", "--set", "output.manifest_part_rows=4"]

    # 1. The plan covers all 3 GPUs: each stage's bundles are on every worker, as many as it has GPUs (the head
    # has none: nothing there); stage actors run on every worker, never two of one stage on one GPU.
    proc = run_cli(prompts, out, c.address, env, *tiny, *flush, wait=False)
    deadline, nodes, groups, ledgers = time.monotonic() + 600, set(), {}, []
    while time.monotonic() < deadline and proc.poll() is None and nodes != set(gpus_of):
        if Path(out, "manifest").exists() and any(Path(out, "manifest").glob("*.parquet")):
            nodes = {node for node, _ in placements(out)}
            if not set(CASCADE) <= set(groups):  # all reserved before the stream started, held until the run ends
                groups, ledgers = planned_groups(c.address)  # (a process each: asked once records come)
        time.sleep(0.5)
    assert nodes == set(gpus_of), f"stage actors ran on {nodes}, expected every worker {set(gpus_of)}"
    # the writers' ledger is on the driver's node (the head: Ray joins a driver to the head of its host), never on a
    # worker that may leave (it was once: the run then ended on the ledger's lost actor, not saying the node)
    assert ledgers and set(ledgers) == {c.head_node.node_id[:12]}, (ledgers, c.head_node.node_id[:12])
    for stage in ("stage_1", "stage_2", "stage_3"):
        assert groups[stage] == Counter(gpus_of), groups
    assert sum(groups["text_encoder"].values()) == 1
    for (_node, gpu_ids), held in placements(out).items():
        stages = [s for s, _ in held]
        assert len(gpu_ids) == 1 and len(stages) == len(set(stages)), held  # one of each stage per GPU, at most

    # 2. The 2-GPU worker leaves mid-run: the run completes on what remains, or ends saying why; a rerun finishes.
    assert proc.poll() is None, "the run ended before a worker could be removed"
    c.remove_node(workers[0], allow_graceful=False)
    stdout, stderr = proc.communicate(timeout=600)
    assert "plan: 3 x H200" in stdout + stderr and f"{'stage_3':<14}{3:>9}" in stdout + stderr
    assert "cluster: 2 + 1 GPUs on 2 nodes" in stdout + stderr
    done_before = ok_records(out)
    if proc.returncode != 0:  # generation had started: exit 1, not "could not start", and a run record says why
        assert proc.returncode == 1 and "stopped after generation started" in stderr, stderr[-3000:]
        lost = workers[0]  # named as an operator finds it: id and address
        named = rf"node {lost.node_id[:12]} \({re.escape(lost.node_ip_address)}\) holding stage_\d's planned GPUs left"
        assert re.search(named, stderr) and "Rerun the same command" in stderr, stderr[-3000:]
        # the terminal has ifbatch's lines, not the libraries' tracebacks (Ray Data's, Ray core's, Prefect's: 167
        # lines before); the whole cause is in the run record (and the flow run's logs on the dashboard)
        assert "Traceback" not in stdout + stderr and "  File " not in stdout + stderr, stderr[-5000:]
        assert 0 < len(done_before) < images
        stopped = [json.loads(p.read_text()) for p in Path(out, "runs").glob("*.json")]
        stopped = [r for r in stopped if r.get("status") == "stopped"]
        assert [r["counts"]["done"] for r in stopped] == [len(done_before)]
        assert "Traceback" in stopped[0]["traceback"] and "ClusterChanged" in stopped[0]["traceback"]
    res = run_cli(prompts, out, c.address, env, *tiny)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{len(done_before)} images already in the manifest are skipped" in res.stdout + res.stderr or (
        len(done_before) == images
    )
    ids = ok_records(out)
    assert len(ids) == images and len(set(ids)) == images  # every image exactly once, in the parts themselves
    record = max(Path(out, "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
    plan = json.loads(record.read_text())["plan"]
    assert plan["gpus"] == 1 and plan["stages"]["stage_3"]["replicas"] == 1  # planned for the GPUs that remain
    assert sorted(n["gpus"] for n in plan["cluster"]) == [1]
    print(f"run with a worker removed: exit {proc.returncode}, {len(done_before)} images recorded before the rerun")
