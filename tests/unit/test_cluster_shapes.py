"""Plans for the clusters users have: GPU kinds the cost table did not measure, GPUs too small for the whole
cascade, and the node-by-node placement of every plan on nodes of 1, 2, 4 and 8 GPUs, uneven nodes and GPUs
partly taken. The placement is checked as Ray makes it: bundles pinned to nodes, each fraction first-fit on one
GPU of its node, in the plan's reservation order."""

from __future__ import annotations

import itertools
import math

import pytest

from ifbatch.configs import load_config
from ifbatch.configs.costs import load_costs
from ifbatch.configs.schema import CASCADE
from ifbatch.tasks.stream.pipeline import PipelineResult
from ifbatch.tasks.stream.planner import MEMORY_HEADROOM, PlanError, plan
from ifbatch.tasks.stream.ray.cluster import ClusterGpus, GpuNode, assign
from ifbatch.tasks.stream.ray.placing import Calibration, make_plan

COSTS = load_costs()
H200 = {s: COSTS.cost("H200", s, getattr(load_config("if-xl"), s).source) for s in CASCADE}


@pytest.mark.parametrize(
    "kind, memory, factor",
    [("H100", None, 1.0), ("A100", None, 989 / 312), ("A100", 40, 989 / 312), ("L40S", None, 989 / 362),
     ("L4", None, 989 / 121), ("A10G", None, 989 / 125),
     ("RTX-PRO-6000", 96, 989 / 65)],  # unknown: as the slowest GPU the table knows (T4), never as an H200
)  # fmt: skip
def test_a_kind_the_table_did_not_measure_is_planned_as_an_estimate(kind, memory, factor):
    p = plan(load_config("if-xl"), COSTS, 8, kind, memory_gb=memory)
    assert p.estimated and "estimate" in p.costs_from and p.kind == kind
    assert p.memory_gb == (memory or COSTS.gpus[kind].memory_gb)
    for s in CASCADE:
        assert p.stages[s].seconds_per_image == pytest.approx(H200[s].seconds_per_image * factor)
    assert any("the costs are estimates" in line and "re-plans" in line for line in p.lines(10))
    measured = plan(load_config("if-xl"), COSTS, 8, kind, memory_gb=memory, measured={"stage_3": 9.0}, measured_by="x")
    assert not measured.estimated  # a run's own timings replace the estimate
    assert not plan(load_config("if-xl"), COSTS, 8, "H200").estimated


@pytest.mark.parametrize(
    "given, name", [("h100", "H100"), ("NVIDIA-H100-80GB-HBM3", "H100"), ("a10g", "A10G"), ("l40s", "L40S")]
)
def test_a_kind_is_found_in_any_case_and_as_ray_or_nvidia_smi_spell_it(given, name):
    p = plan(load_config("if-xl"), COSTS, 8, given)
    assert p.kind == name and p.memory_gb == COSTS.gpus[name].memory_gb


def test_an_unknown_kind_is_costed_conservatively_says_how_and_suggests_a_name():
    cfg = load_config("if-xl", ["plan.gpu_memory_gb=24"])
    slow = plan(cfg, COSTS, 8, "RTX4090", memory_gb=24)
    assert (
        "RTX4090 is not in the table" in slow.costs_from and "as the slowest GPU the table knows, T4" in slow.costs_from
    )
    assert slow.stages["stage_3"].seconds_per_image == pytest.approx(H200["stage_3"].seconds_per_image * 989 / 65)
    told = plan(cfg, load_costs(None, assumed_tflops=165.0), 8, "RTX4090", memory_gb=24)  # plan.gpu_tflops=165
    assert "plan.gpu_tflops = 165" in told.costs_from
    assert told.stages["stage_3"].seconds_per_image == pytest.approx(H200["stage_3"].seconds_per_image * 989 / 165)
    assert told.images_per_second > slow.images_per_second  # and never the H200's figure
    assert told.images_per_second < plan(cfg, COSTS, 8, "H200", memory_gb=24).images_per_second
    assert "did you mean H100?" in plan(cfg, COSTS, 8, "H10", memory_gb=24).costs_from


def fits(p, memory: float) -> bool:
    return all(g.memory_gb <= MEMORY_HEADROOM * memory for g in p.groups)


@pytest.mark.parametrize("memory, groups", [(24, 3), (48, 2), (80, 1), (141, 1)])
def test_stages_that_do_not_fit_one_gpu_are_split_over_gpus_in_the_ratio_of_their_costs(memory, groups):
    cfg = load_config("if-xl")
    p = plan(cfg, COSTS, 8, "L4", memory_gb=memory)
    assert fits(p, memory) and len(p.groups) == groups and p.shared_gpus == 8
    assert sorted(s for g in p.groups for s in g.stages) == sorted(CASCADE)  # each stage in exactly one group
    mem = {s: H200[s].weights_gb + H200[s].activations_gb for s in CASCADE}
    cap = MEMORY_HEADROOM * memory
    for k in range(1, groups):  # no split into fewer groups fits
        for labels in itertools.product(range(k), repeat=len(CASCADE)):
            assert any(sum(mem[s] for s, lab in zip(CASCADE, labels, strict=True) if lab == i) > cap for i in range(k))
    sec = [g.seconds_per_image for g in p.groups]
    best = max(
        min(n / c for n, c in zip(deal, sec, strict=True))
        for deal in itertools.product(range(1, 9), repeat=groups)
        if sum(deal) == 8
    )
    assert p.images_per_second == pytest.approx(best)  # no other whole-GPU split of this grouping is faster
    assert p.images_per_second >= 0.85 * 8 / sum(s.seconds_per_image for s in p.stages.values())
    for i, g in enumerate(p.groups):  # every stage of a group: one actor per GPU of it (the T5 sliver: one)
        for s in g.stages:
            st = p.stages[s]
            assert st.group == i and st.replicas == (1 if s == "text_encoder" else g.gpus)
    if groups > 1:
        assert "does not fit one GPU's memory" in p.lines(10)[0] and p.record()["groups"][0]["gpus"] >= 1


def test_a_stage_too_large_for_the_gpu_at_its_batch_runs_at_a_smaller_one():
    p = plan(load_config("if-xl", ["scorer.source=null"]), COSTS, 4, "T4")  # 16 GB: stage III's batch 4 needs 18 GB
    s3 = p.stages["stage_3"]
    assert s3.batch_size == math.floor((0.9 * 16 - 1.8) / (16.2 / 4)) == 3 and fits(p, 16)
    assert any("stage_3 runs at batch 3, not 4" in n for n in p.notes)
    # with the default scorer, stage III also holds CLIP's 0.86 GB to score every final image: one image less
    p = plan(load_config("if-xl"), COSTS, 4, "T4")
    assert p.stages["stage_3"].batch_size == math.floor((0.9 * 16 - 1.8 - 0.86) / (16.2 / 4)) == 2 and fits(p, 16)


def place(p, nodes: list[GpuNode]) -> dict[tuple[str, int], list[str]]:
    """Reserve as Ray does: each stage's bundles on their pinned nodes, each on the first GPU of that node with room
    (a GPU partly taken by another job has less); returns (node, GPU) -> stages held."""
    where = assign(p, tuple(nodes))
    room = {(n.node_id, i): (1.0 if i < n.gpus else 0.0) for n in nodes for i in range(n.total)}
    held: dict[tuple[str, int], list[str]] = {k: [] for k in room}
    for stage in p.reservation_order:
        s = p.stages[stage]
        assert len(where[stage]) == s.replicas
        for node in where[stage]:
            gpus = [k for k in room if k[0] == node]
            if s.num_gpus >= 1:
                free = [k for k in gpus if room[k] >= 1.0][: int(s.num_gpus)]
                assert len(free) == int(s.num_gpus), f"{stage} found no whole GPU on {node}"
            else:
                free = [next(k for k in gpus if room[k] + 1e-9 >= s.num_gpus)]
            for k in free:
                room[k] -= min(1.0, s.num_gpus)
                held[k].append(stage)
    return held


SHAPES = {
    "1+1": [1, 1],
    "2 x 4": [4, 4],
    "4 x 4": [4, 4, 4, 4],
    "2 x 8": [8, 8],
    "8+4+2": [8, 4, 2],
    "4+4+2": [4, 4, 2],
}


def nodes_of(sizes: list[int], taken: list[int] | None = None) -> list[GpuNode]:
    taken = taken or [0] * len(sizes)
    return [GpuNode(f"node{i}", g - t, g, 8.0 * g, "H200") for i, (g, t) in enumerate(zip(sizes, taken, strict=True))]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("memory", [141, 48, 24])
def test_every_gpu_of_every_shape_holds_one_actor_of_each_stage_of_its_group(shape, memory):
    nodes = nodes_of(SHAPES[shape])
    n = sum(SHAPES[shape])
    if memory == 24 and n < 3:
        with pytest.raises(PlanError, match="cannot be split"):
            plan(load_config("if-xl"), COSTS, n, "H200", memory_gb=memory)
        return
    p = plan(load_config("if-xl"), COSTS, n, "H200", memory_gb=memory, cpus_per_gpu=8)
    held = place(p, nodes)
    assert all(held.values()), "a GPU holds no actor"
    te = [k for k, v in held.items() if "text_encoder" in v]
    assert len(te) == 1
    for stages in held.values():
        group = next(g for g in p.groups if stages[0] in g.stages)
        assert sorted(s for s in stages if s != "text_encoder") == sorted(
            s for s in group.stages if s != "text_encoder"
        )
    for g in p.groups:  # each group holds exactly its GPUs
        assert sum(1 for v in held.values() if v[0] in g.stages) == g.gpus


def test_hand_placed_stages_and_gpus_partly_taken_place_too():
    nodes = nodes_of([8, 4, 2], taken=[1, 0, 2])  # 11 free: the 2-GPU node is wholly taken
    keys = frozenset({"stage_3.replicas", "stage_3.num_gpus"})
    cfg = load_config("if-xl", ["stage_3.replicas=2", "stage_3.num_gpus=2"])
    p = plan(cfg, COSTS, sum(n.gpus for n in nodes), "H200", explicit=keys, cpus_per_gpu=8)
    held = place(p, nodes)
    assert sum(1 for v in held.values() if v == ["stage_3"]) == 4 and p.shared_gpus == 7
    assert not any(held[("node2", i)] for i in range(2))  # nothing on the GPUs another job holds
    for v in held.values():
        assert v in ([], ["stage_3"]) or sorted(v) in (sorted(CASCADE[1:3]), sorted(CASCADE[:3]))
    # two whole GPUs per replica must be on one node: nodes of 1 GPU cannot hold them, and say so at once
    with pytest.raises(PlanError, match=r"stage_3: 2 replicas of 2 whole GPUs each do not fit .* on one node"):
        assign(plan(cfg, COSTS, 6, "H200", explicit=keys), tuple(nodes_of([1] * 6)))


def result_of(images: int, seconds: dict[str, float]) -> PipelineResult:
    r = PipelineResult(done=images)
    r.stage_seconds = {s: v * images for s, v in seconds.items()}
    return r


def test_estimated_costs_are_corrected_from_the_runs_first_images_within_the_run():
    cluster = ClusterGpus(tuple(nodes_of([4, 4])))
    cfg = load_config("if-xl", ["plan.gpu_kind=A100"])  # 80 GB: the whole cascade on every GPU
    placement = make_plan(cfg, frozenset(), 10_000, None, cluster=cluster)
    assert placement.plan.estimated and "estimate" in placement.record["costs_from"]
    cal = Calibration.of(placement, cfg, frozenset(), 10_000)
    assert cal.at == 2 * 8 * 32 and not cal.phased  # two batches of 32 on each of 8 stage I replicas
    writers = placement.plan.writers
    measured = {"text_encoder": 0.01, "stage_1": 3.0, "stage_2": 2.0, "stage_3": 5.0}
    cal(result_of(cal.at - 1, measured))
    assert placement.plan.estimated  # not yet
    cal(result_of(cal.at, measured))
    p = placement.plan
    assert not p.estimated and p.costs_from.startswith(f"this run's first {cal.at} images")
    assert p.images_per_second == pytest.approx(8 / 10.01) and p.writers == writers  # the running pool is kept
    assert placement.record["calibration"]["images"] == cal.at and placement.record["cluster"]
    assert cal.lines[0] == f"re-planned from this run's first {cal.at} images (the placement stays):"
    assert Calibration.of(placement, cfg, frozenset(), 100).at == 0  # too few images to be worth it
    measured_kind = make_plan(load_config("if-xl"), frozenset(), 10_000, None, cluster=cluster)
    assert Calibration.of(measured_kind, load_config("if-xl"), frozenset(), 10_000).done


def scripted_watch(answers: list, stop_after_s: float):
    """A NodeWatch whose check answers from a script (the Ray side, check(), is tested on real clusters:
    tests/e2e/test_multinode.py); release() is the test's, which notes what it was asked to remove."""
    from ifbatch.tasks.stream.ray.cluster import NodeWatch

    class Scripted(NodeWatch):
        def check(self):
            answer = answers.pop(0) if answers else None
            if isinstance(answer, Exception):
                raise answer
            return answer

    return Scripted({"stage_1": object()}, every_s=0.05, stop_after_s=stop_after_s)


def test_a_node_watch_stops_a_stream_left_waiting_and_survives_a_failed_check(monkeypatch):
    import threading
    import time

    from ifbatch.tasks.stream.ray import cluster

    released = []
    monkeypatch.setattr(cluster, "release", released.append)

    called = threading.Event()
    w = scripted_watch([None, RuntimeError("control store busy"), "node abc holding stage_1's GPUs left"], 0.3)
    w.on_lost = called.set
    with w:
        assert called.wait(5)  # a failed check did not end the watch; the stream was stopped 0.3 s after
    assert w.lost == "node abc holding stage_1's GPUs left" and w.stopped_stream and released == [w.groups]

    called.clear()  # a stream that ends by itself within the time (the run leaves the watch) is not stopped
    w = scripted_watch(["node abc holding stage_1's GPUs left"], 5.0)
    w.on_lost = called.set
    with w:
        time.sleep(0.5)
    assert w.lost and not called.is_set() and not w.stopped_stream


def test_a_cost_row_the_table_marks_unmeasured_is_said_to_be_an_estimate():
    p = plan(load_config("if-xl", ["data.candidates_per_image=2"]), COSTS, 8, "H200")
    assert p.costs_from == "the cost table (H200); estimate: scorer is not measured"
    assert plan(load_config("if-xl"), COSTS, 8, "H200").costs_from == "the cost table (H200)"
