"""Plans reserved on real multi-node Ray clusters of fake GPUs (ray.cluster_utils: each node its own raylet): a head
without GPUs and nodes of 4, 4 and 2 GPUs. Every plan -- the whole cascade on every GPU, the cascade split over
24 GB GPUs, GPUs partly taken by another job -- reserves within seconds, and each GPU then holds exactly the
actors the plan meant for it. A plan that cannot be reserved says so within seconds. A plain run's Ray session is
a private local cluster, whatever address file a dead `ray start` left."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import defaultdict

import pytest

from ifbatch.configs import load_config
from ifbatch.tasks.stream.plan import PlanError
from ifbatch.tasks.stream.ray.cluster import cluster_gpus, release, reserve
from ifbatch.tasks.stream.ray.placing import Calibration, make_plan

from ..services import fake_gpu_cluster

pytestmark = pytest.mark.slow

SHAPE = [4, 4, 2]


@pytest.fixture(scope="module")
def cluster():
    """The multi-node cluster, this process its driver. It must be the first cluster this process joins: the
    session's one-node cluster (conftest.ray_cluster) stays connected once a test asks for it, and a process is
    the driver of one cluster at a time. (The file's name runs it before every test that asks for it.)"""
    import ray

    assert not ray.is_initialized(), "run before any test that uses the session's ray_cluster (see the docstring)"
    with fake_gpu_cluster(SHAPE, object_store_mb=128, head_cpus=2, quick_node_death=True) as (c, nodes):
        ray.init(address=c.address, logging_level="WARNING")
        try:
            yield c, nodes
        finally:
            ray.shutdown()


def all_free(timeout_s: float = 20.0) -> None:
    """Wait until the cluster's resource view has every GPU back (removing a group is seen a moment later)."""
    from ray._private.state import available_resources_per_node

    deadline = time.monotonic() + timeout_s
    while sum(r.get("GPU", 0) for r in available_resources_per_node().values()) < sum(SHAPE):
        assert time.monotonic() < deadline, available_resources_per_node()
        time.sleep(0.2)


def held_gpus(groups: dict, plan) -> dict[tuple, list[str]]:
    """(node, GPU id) -> the stages whose bundles Ray put there: a task in each bundle asks for the bundle's share
    and says where it ran."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote
    def where():
        return ray.get_runtime_context().get_node_id(), tuple(ray.get_gpu_ids())

    held = defaultdict(list)
    for stage, pg in groups.items():
        s = plan.stages[stage]
        refs = [
            where.options(
                num_gpus=s.num_gpus,
                num_cpus=s.num_cpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
            ).remote()
            for i in range(s.replicas)
        ]
        for node, gpus in ray.get(refs, timeout=60):
            for g in gpus:
                held[(node, g)].append(stage)
    return held


@pytest.mark.parametrize("memory", [None, 24])
def test_a_plan_reserves_at_once_and_every_gpu_holds_its_groups_actors(cluster, memory):
    all_free()
    over = [f"plan.gpu_memory_gb={memory}"] if memory else []
    placement = make_plan(load_config("if-xl", over), frozenset(), 100, None)
    p = placement.plan
    assert p.gpus == 10 and placement.cluster.shape() == "4 + 4 + 2 GPUs on 3 nodes"
    assert len(p.groups) == (3 if memory else 1)
    t0 = time.monotonic()
    groups = reserve(p, placement.cluster.nodes)
    try:
        assert time.monotonic() - t0 < 10
        held = held_gpus(groups, p)
        assert len(held) == 10  # every GPU of every node holds something; none of the head's
        for stages in held.values():
            group = p.groups[p.stages[stages[0]].group]
            assert sorted(s for s in stages if s != "text_encoder") == sorted(
                s for s in group.stages if s != "text_encoder"
            )
        assert sum(stages.count("text_encoder") for stages in held.values()) == 1
        for g in p.groups:
            assert sum(1 for v in held.values() if v[0] in g.stages) == g.gpus
    finally:
        release(groups)


def test_gpus_another_job_holds_are_left_alone_and_what_cannot_be_reserved_is_said_at_once(cluster):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    _, nodes = cluster
    four = nodes[0].node_id
    all_free()

    @ray.remote
    class Holder:
        def gpus(self):
            return ray.get_runtime_context().get_node_id(), ray.get_gpu_ids()

    other = Holder.options(num_gpus=1, num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(four, False))
    holder = other.remote()
    node, taken = ray.get(holder.gpus.remote(), timeout=60)
    try:
        c = cluster_gpus()
        assert c.gpus == 9 and c.total == 10 and "9 free" in c.shape()
        placement = make_plan(load_config("if-xl"), frozenset(), 100, None)
        assert placement.plan.gpus == 9
        groups = reserve(placement.plan, placement.cluster.nodes)
        try:
            held = held_gpus(groups, placement.plan)
            assert len(held) == 9 and (node, taken[0]) not in held
        finally:
            release(groups)
        # another job takes every CPU of a 4-GPU node after the plan was made: the reservation fails in seconds,
        # saying what is free
        cpus = Holder.options(num_cpus=8, num_gpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(four, False))
        hog = cpus.remote()
        ray.get(hog.gpus.remote(), timeout=60)
        t0 = time.monotonic()
        with pytest.raises(PlanError, match=r"could not reserve stage_3's 9 x .* in 3 s; free now: .*0 CPUs"):
            reserve(placement.plan, placement.cluster.nodes, timeout_s=3)
        assert time.monotonic() - t0 < 8
        assert not [pg for pg in ray.util.placement_group_table().values() if pg["state"] == "PENDING"]
        ray.kill(hog)
    finally:
        ray.kill(holder)


def test_a_node_whose_every_gpu_another_job_holds_has_none_free_and_all_held_is_refused_at_once(cluster):
    """Ray leaves a resource out of a node's view when none of it is free: read as "all free", a plan promised the
    held node's GPUs and the run failed to reserve them on every rerun (and "every GPU is held" could never be
    said). Plan and run read the cluster the same way (make_plan -> cluster_gpus)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    _, nodes = cluster
    all_free()

    @ray.remote(num_cpus=0)
    class Holder:
        def ready(self):
            return True

    def hold(node_id: str, gpus: int):
        h = Holder.options(num_gpus=gpus, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, False)).remote()
        ray.get(h.ready.remote(), timeout=60)
        return h

    two = nodes[SHAPE.index(2)]
    held = [hold(two.node_id, 2)]  # the 2-GPU node, whole
    try:
        deadline = time.monotonic() + 20  # (the resource view catches up a moment later)
        while cluster_gpus().gpus != 8 and time.monotonic() < deadline:
            time.sleep(0.2)
        c = cluster_gpus()
        assert c.gpus == 8 and {n.node_id: n.gpus for n in c.nodes}[two.node_id] == 0, c
        placement = make_plan(load_config("if-xl"), frozenset(), 100, None)
        assert placement.plan.gpus == 8
        groups = reserve(placement.plan, placement.cluster.nodes, timeout_s=30)  # on the free GPUs, at once
        release(groups)
        held += [hold(n.node_id, g) for n, g in zip(nodes, SHAPE, strict=True) if n is not two]  # every GPU now
        deadline = time.monotonic() + 20
        while cluster_gpus().gpus and time.monotonic() < deadline:
            time.sleep(0.2)
        t0 = time.monotonic()
        with pytest.raises(PlanError, match=r"every GPU of the Ray cluster \(4 \+ 4 \+ 2 GPUs on 3 nodes, 0 free\)"):
            make_plan(load_config("if-xl"), frozenset(), 100, None)
        assert time.monotonic() - t0 < 30
    finally:
        for h in held:
            ray.kill(h)


def test_a_plain_run_starts_its_own_cluster_beside_a_dead_ones_address_file():
    """`ray start` leaves its address in <tmp>/ray/ray_current_cluster; plain ray.init() joins it, and waits for
    ever when that cluster has died. A run's session (ray_session) starts a private cluster instead."""
    tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay short
    os.makedirs(f"{tmp}/ray")
    with open(f"{tmp}/ray/ray_current_cluster", "w") as f:
        f.write("127.0.0.1:1")  # nothing listens there
    code = textwrap.dedent(
        """
        import ray
        from ifbatch.configs.schema import RayConfig
        from ifbatch.tasks.stream.ray.session import ray_session
        with ray_session(RayConfig(num_cpus=1, num_gpus=0, object_store_gb=0.1)):
            print("gcs", ray.get_runtime_context().gcs_address, ray.cluster_resources().get("CPU"))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": tmp}
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(line for line in res.stdout.splitlines() if line.startswith("gcs "))
    assert not line.split()[1].endswith(":1") and line.split()[2] == "1.0"  # its own one-CPU cluster
    assert time.monotonic() - t0 < 60
    subprocess.run(["rm", "-rf", tmp], check=False)


def test_a_split_plan_of_estimated_costs_is_dealt_again_from_the_first_phases_timings(cluster):
    import pyarrow as pa
    from ray.util import placement_group_table

    from ifbatch.tasks.stream.pipeline import PipelineResult

    all_free()
    cfg = load_config("if-xl", ["plan.gpu_kind=L4"])  # 24 GB, estimated: T5 + II, I and III each on GPUs of their own
    placement = make_plan(cfg, frozenset(), 10_000, None)
    before = placement.plan
    assert before.estimated and len(before.groups) == 3
    placement.groups = reserve(before, placement.cluster.nodes)
    old = list(placement.groups.values())
    cal = Calibration.of(placement, cfg, frozenset(), 10_000)
    assert cal.phased and cal.at > 0
    rows = pa.table({"images": pa.array([[0, 1]] * 5000, pa.list_(pa.int32()))})
    assert cal.first_rows(rows) == cal.at // 2  # rows of two images each
    # stage I turns out the costliest: the GPUs are dealt again for the rest of the run
    made = PipelineResult(done=cal.at)
    made.stage_seconds = {
        "text_encoder": 0.0,
        "stage_1": 9.0 * cal.at,
        "stage_2": 1.0 * cal.at,
        "stage_3": 3.0 * cal.at,
    }
    cal.calibrate(made)
    try:
        after = placement.plan
        assert not after.estimated and cal.lines[0].endswith("(the GPUs are dealt again for the rest):")
        g1 = next(g for g in after.groups if "stage_1" in g.stages)
        assert g1.gpus > next(g for g in before.groups if "stage_1" in g.stages).gpus
        assert placement.cfg.stage_1.replicas == g1.gpus and placement.record["calibration"]["images"] == cal.at
        assert all(placement_group_table(pg)["state"] == "REMOVED" for pg in old)
        held = held_gpus(placement.groups, after)
        assert len(held) == 10 and sum(1 for v in held.values() if "stage_1" in v) == g1.gpus
    finally:
        release(placement.groups)


def test_ifbatch_plan_counts_the_clusters_nodes_and_free_gpus(cluster):
    from pathlib import Path

    all_free()
    c, _ = cluster
    ifbatch = str(Path(sys.executable).with_name("ifbatch"))
    examples = str(Path(__file__).resolve().parents[2] / "examples" / "prompts.parquet")
    res = subprocess.run(
        [ifbatch, "plan", examples, "--preset", "if-xl", "--ray-address", c.address, "--set", "plan.gpu_memory_gb=48"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "cluster: 4 + 4 + 2 GPUs on 3 nodes" in res.stdout and "plan: 10 x H200 (48 GB)" in res.stdout
    assert "the GPUs are split 7 x (stage_2 + stage_3), 3 x (text_encoder + stage_1)" in res.stdout, res.stdout


def test_a_node_that_leaves_is_named_by_id_and_address(cluster):
    """The node watch's reason names the node that left as an operator finds it (`ray list nodes`): its id and
    address, also once Ray has begun to reschedule the group and no longer says where its bundles were."""
    import ray
    from ray.util.placement_group import placement_group

    from ifbatch.tasks.stream.ray.cluster import NodeWatch

    c, _ = cluster
    extra = c.add_node(num_cpus=1, num_gpus=1, resources={"leaving": 1}, object_store_memory=128 << 20)
    c.wait_for_nodes()
    pg = placement_group([{"GPU": 1, "leaving": 1}])
    ray.get(pg.ready(), timeout=60)
    watch = NodeWatch({"stage_3": pg})
    assert watch.check() is None
    c.remove_node(extra, allow_graceful=False)
    deadline, lost = time.monotonic() + 60, None
    while lost is None and time.monotonic() < deadline:
        time.sleep(0.5)
        lost = watch.check()
    assert (
        lost
        == f"node {extra.node_id[:12]} ({extra.node_ip_address}) holding stage_3's planned GPUs left the Ray cluster"
    )
    release({"stage_3": pg})
    all_free()
