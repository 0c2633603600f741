"""The plan's placement on a real Ray cluster (4 fake GPUs): one actor of each stage on every GPU."""

from __future__ import annotations

import pytest

from ifbatch.configs import load_config
from ifbatch.configs.costs import load_costs
from ifbatch.configs.schema import STAGES
from ifbatch.tasks.stream.planner import plan, release, reserve

pytestmark = pytest.mark.slow


def test_stage_groups_reserved_costliest_first_put_one_of_each_stage_on_every_gpu(ray_cluster):
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=0)
    class Probe:
        def gpus(self):
            return ray.get_gpu_ids()

    gpus = int(ray.cluster_resources()["GPU"])
    p = plan(load_config("if-xl"), load_costs(), gpus, "H200")
    groups, actors = reserve(p), {}
    try:
        actors = {  # the cheapest stage's actors start first, as Ray Data starts the text encoder's pool first
            stage: [
                Probe.options(
                    num_gpus=p.stages[stage].num_gpus,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(groups[stage]),
                ).remote()
                for _ in range(p.stages[stage].replicas)
            ]
            for stage in reversed(p.reservation_order)
        }
        on = {stage: sorted(ray.get([a.gpus.remote() for a in acts], timeout=120)) for stage, acts in actors.items()}
        for stage in STAGES:
            assert [ids for ids in on[stage]] == [[g] for g in range(gpus)], (stage, on)
    finally:
        for acts in actors.values():
            for a in acts:
                ray.kill(a)
        release(groups)
