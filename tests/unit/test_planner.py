"""The planner: its numbers are the cost table's arithmetic, and its fractions admit one packing only."""

from __future__ import annotations

import pytest

from ifbatch.configs import ConfigError, load_config
from ifbatch.configs.costs import load_costs
from ifbatch.configs.schema import STAGES
from ifbatch.flows.cli import main
from ifbatch.tasks.stream.planner import PlanError, forcing_fractions, plan

from ..helpers import EXAMPLES

COSTS = load_costs()


def table_costs(cfg):
    return {s: COSTS.cost("H200", s, getattr(cfg, s).source) for s in STAGES}


@pytest.mark.parametrize("gpus", [1, 2, 3, 4, 8, 16])
def test_plan_numbers_are_the_cost_tables_arithmetic(gpus):
    cfg = load_config("if-xl")
    c = table_costs(cfg)
    total = sum(x.seconds_per_image for x in c.values())
    p = plan(cfg, COSTS, gpus, "H200")
    assert p.images_per_second == pytest.approx(gpus / total)
    assert p.memory_needed_gb == pytest.approx(sum(x.weights_gb + x.activations_gb for x in c.values()))
    for s in STAGES:
        assert p.stages[s].replicas == gpus and p.stages[s].batch_size == c[s].batch_size
        assert p.stages[s].share == pytest.approx(c[s].seconds_per_image / total)
    wall, gpu_hours = p.estimate(36)
    assert wall == pytest.approx(36 * total / gpus) and gpu_hours == pytest.approx(36 * total / 3600)
    assert sum(s.num_gpus for s in p.stages.values()) <= 1.0
    assert f"{s}.replicas={gpus}" in p.overrides()


def test_more_steps_cost_proportionally_more():
    base = plan(load_config("if-xl"), COSTS, 4, "H200")
    half = plan(load_config("if-xl", ["stage_1.steps=50", "stage_2.timesteps=smart27"]), COSTS, 4, "H200")
    assert half.stages["stage_1"].seconds_per_image == pytest.approx(base.stages["stage_1"].seconds_per_image / 2)
    assert half.stages["stage_2"].seconds_per_image == pytest.approx(base.stages["stage_2"].seconds_per_image * 27 / 50)


@pytest.mark.parametrize("gpus", [1, 2, 3, 8])
def test_reserved_costliest_first_every_gpu_gets_one_of_each_stage(gpus):
    """First-fit, as Ray packs fractions: each stage's bundles after the costlier ones', in any GPU order."""
    p = plan(load_config("if-xl"), COSTS, gpus, "H200")
    free, holds = [1.0] * gpus, [[] for _ in range(gpus)]
    for stage in p.reservation_order:
        for _ in range(p.stages[stage].replicas):
            g = next(i for i in range(gpus) if free[i] + 1e-9 >= p.stages[stage].num_gpus)
            free[g] -= p.stages[stage].num_gpus
            holds[g].append(stage)
    assert all(sorted(h) == sorted(STAGES) for h in holds)


def test_fractions_leave_no_room_for_a_second_of_any_stage():
    f = forcing_fractions(4)
    assert sum(f) <= 1.0 and f == sorted(f, reverse=True)
    for k in range(3):
        assert 2 * f[k] > 1.0 - sum(f[:k])  # after the costlier ones, two of this one do not fit


def test_what_no_plan_can_be_made_for_is_named():
    with pytest.raises(ConfigError, match=r"no cost for stage_1 model 'DeepFloyd/IF-I-L-v1.0' on H200"):
        plan(load_config("if-l"), COSTS, 2, "H200")
    with pytest.raises(ConfigError, match=r"no GPU kind 'A100'"):
        plan(load_config("if-xl"), COSTS, 2, "A100")
    small = COSTS.model_copy(update={"gpus": {"H200": COSTS.gpus["H200"].model_copy(update={"memory_gb": 40.0})}})
    with pytest.raises(PlanError, match=r"needs 53.1 GB per GPU.*40 GB"):
        plan(load_config("if-xl"), small, 2, "H200")
    with pytest.raises(PlanError, match="at least one GPU"):
        plan(load_config("if-xl"), COSTS, 0, "H200")


def test_ifbatch_plan_prints_the_plan_and_the_estimate(capsys):
    assert main(["plan", str(EXAMPLES), "--preset", "if-xl", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    total = sum(x.seconds_per_image for x in table_costs(load_config("if-xl")).values())
    assert "36 rows to generate" in out and f"{8 / total:.3f} images/s" in out
    assert f"36 images in {36 * total / 8:.0f} s, {36 * total / 3600:.3f} GPU-hours" in out
    assert "stage_3               8     0.5100      4    2.870          54.1%" in out
    assert main(["plan", str(EXAMPLES), "--preset", "if-l", "--gpus", "2"]) == 2
    assert "IF-I-L-v1.0" in capsys.readouterr().err
