"""The planner: its numbers are the cost table's arithmetic, and its fractions admit one packing only."""

from __future__ import annotations

import math

import pytest

from ifbatch.configs import ConfigError, load_config
from ifbatch.configs.costs import load_costs
from ifbatch.configs.schema import CASCADE
from ifbatch.flows.cli import main
from ifbatch.tasks.stream.planner import PlanError, forcing_fractions, plan

from ..helpers import EXAMPLES

COSTS = load_costs()


def table_costs(cfg):
    return {s: COSTS.cost("H200", s, getattr(cfg, s).source) for s in CASCADE}


@pytest.mark.parametrize("gpus", [1, 2, 3, 4, 8, 16])
def test_plan_numbers_are_the_cost_tables_arithmetic(gpus):
    cfg = load_config("if-xl")
    c = table_costs(cfg)
    total = sum(x.seconds_per_image for x in c.values())
    p = plan(cfg, COSTS, gpus, "H200")
    assert p.images_per_second == pytest.approx(gpus / total)
    clip = COSTS.cost("H200", "scorer", cfg.scorer.source).weights_gb  # stage III scores every final image
    assert p.memory_needed_gb == pytest.approx(sum(x.weights_gb + x.activations_gb for x in c.values()) + clip)
    for s in CASCADE:
        # the text encoder's whole load is a sliver of one GPU: one actor; every diffusion stage one per GPU
        assert p.stages[s].replicas == (1 if s == "text_encoder" else gpus)
        assert p.stages[s].batch_size == c[s].batch_size and not p.stages[s].by_hand
        assert p.stages[s].share == pytest.approx(c[s].seconds_per_image / total)
    wall, gpu_hours = p.estimate(36)
    assert wall == pytest.approx(36 * total / gpus) and gpu_hours == pytest.approx(36 * total / 3600)
    assert sum(s.num_gpus for s in p.stages.values()) <= 1.0
    applied = p.apply(cfg)
    assert (applied.stage_3.replicas, applied.stage_3.num_gpus, applied.stage_3.batch_size) == (gpus, 0.51, 4)
    assert applied.stage_3.steps == cfg.stage_3.steps  # only placement and batches change
    record = p.record()
    assert record["stages"]["stage_1"]["replicas"] == gpus and record["images_per_second"] == p.images_per_second


def test_best_of_k_costs_k_times_stage_one_and_the_scorer_and_says_so_per_kept_image():
    one = plan(load_config("if-xl"), COSTS, 8, "H200")
    four = plan(load_config("if-xl", ["data.candidates_per_image=4"]), COSTS, 8, "H200")
    clip = COSTS.cost("H200", "scorer", "openai/clip-vit-large-patch14")
    assert "scorer" not in one.stages and four.stages["scorer"].seconds_per_image == pytest.approx(
        4 * clip.seconds_per_image
    )
    assert four.stages["stage_1"].seconds_per_image == pytest.approx(4 * one.stages["stage_1"].seconds_per_image)
    assert four.stages["stage_3"].seconds_per_image == one.stages["stage_3"].seconds_per_image  # the winner only
    assert four.candidate_cost == pytest.approx(four.seconds_per_image / one.seconds_per_image)
    assert four.gpu_seconds_per_image == pytest.approx(8 / four.images_per_second)
    assert 1 < four.candidate_cost < 4 and one.candidate_cost == 1.0
    said = "\n".join(four.lines(100))
    assert "best of 4: stage I and the scorer make and score 4 candidates an image" in said
    assert f"{four.gpu_seconds_per_image:.2f} GPU-s per kept image, {four.candidate_cost:.2f}x" in said
    assert four.record()["candidates_per_image"] == 4 and four.record()["cost_vs_one_candidate"] == four.candidate_cost


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
        for _ in range(gpus):  # as many bundles as GPUs for every stage: still one of each per GPU
            g = next(i for i in range(gpus) if free[i] + 1e-9 >= p.stages[stage].num_gpus)
            free[g] -= p.stages[stage].num_gpus
            holds[g].append(stage)
    assert all(sorted(h) == sorted(CASCADE) for h in holds)


def test_fractions_leave_no_room_for_a_second_of_any_stage():
    f = forcing_fractions(4)
    assert sum(f) <= 1.0 and f == sorted(f, reverse=True)
    for k in range(3):
        assert 2 * f[k] > 1.0 - sum(f[:k])  # after the costlier ones, two of this one do not fit


def test_what_no_plan_can_be_made_for_is_named():
    with pytest.raises(ConfigError, match=r"no cost for stage_1 model 'DeepFloyd/IF-I-L-v1.0' on H200"):
        plan(load_config("if-l"), COSTS, 2, "H200")
    with pytest.raises(PlanError, match=r"'MI999' is not in the cost table.*plan.gpu_memory_gb"):
        plan(load_config("if-xl"), COSTS, 2, "MI999")
    with pytest.raises(PlanError, match=r"text_encoder needs 9.5 GB at batch 1.*8 GB: it cannot run on this GPU"):
        plan(load_config("if-xl"), COSTS, 8, "H200", memory_gb=8)
    with pytest.raises(PlanError, match=r"need 54.0 GB .* cannot be split over 1 GPU\(s\) of 40 GB"):
        plan(load_config("if-xl"), COSTS, 1, "H200", memory_gb=40)
    with pytest.raises(PlanError, match=r"stage_3 needs 35.1 GB at batch 8, more than 90% of a H200's 24 GB"):
        keys = frozenset({"stage_3.batch_size"})
        plan(load_config("if-xl", ["stage_3.batch_size=8"]), COSTS, 8, "H200", explicit=keys, memory_gb=24)
    with pytest.raises(PlanError, match="at least one GPU"):
        plan(load_config("if-xl"), COSTS, 0, "H200")


def test_ifbatch_plan_prints_the_plan_and_the_estimate(capsys):
    assert main(["plan", str(EXAMPLES), "--preset", "if-xl", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    total = sum(x.seconds_per_image for x in table_costs(load_config("if-xl")).values())
    assert "36 rows to generate, 36 images" in out and f"{8 / total:.3f} images/s" in out
    assert f"36 images in {36 * total / 8:.0f} s, {36 * total / 3600:.3f} GPU-hours" in out
    assert "stage_3               8     0.5100      4    2.870          54.1%" in out
    assert main(["plan", str(EXAMPLES), "--preset", "if-l", "--gpus", "2"]) == 2
    assert "IF-I-L-v1.0" in capsys.readouterr().err


def test_what_the_user_set_is_kept_and_the_rest_is_planned_around_it():
    keys = frozenset({"stage_3.replicas", "stage_1.batch_size", "stage_2.num_cpus"})
    cfg = load_config("if-xl", ["stage_3.replicas=4", "stage_1.batch_size=8", "stage_2.num_cpus=3"])
    p = plan(cfg, COSTS, 8, "H200", explicit=keys, cpus_per_gpu=8)
    s3 = p.stages["stage_3"]
    assert (s3.replicas, s3.num_gpus, s3.by_hand) == (4, 1.0, True)  # by hand: whole GPUs, reserved first
    assert p.reservation_order[0] == "stage_3" and p.shared_gpus == 4
    assert p.stages["stage_1"].replicas == 4 and p.stages["stage_1"].batch_size == 8  # kept
    assert p.stages["stage_2"].num_cpus == 3 and p.stages["stage_1"].num_cpus == 1.0
    # the stages left share 4 GPUs: 4 / (1.50 + 0.93 + 0.002) images/s; stage III alone makes 4 / 2.87
    assert p.images_per_second == pytest.approx(4 / 2.87) and "stage_3, placed by hand" in p.bottleneck
    assert p.stages["stage_1"].num_gpus == 0.51  # now the costliest of the shared stages
    with pytest.raises(PlanError, match=r"stage_3.num_gpus = 0.5: a stage placed by hand gets whole GPUs"):
        plan(load_config("if-xl", ["stage_3.num_gpus=0.5"]), COSTS, 8, "H200", explicit={"stage_3.num_gpus"})
    with pytest.raises(PlanError, match=r"take 8 of the cluster's 8 GPUs, leaving none for text_encoder"):
        plan(load_config("if-xl", ["stage_3.replicas=8"]), COSTS, 8, "H200", explicit={"stage_3.replicas"})


def test_cpu_reservations_fit_the_gpu_nodes_cpus():
    p = plan(load_config("if-xl"), COSTS, 4, "H200", cpus_per_gpu=2.0)
    per_gpu = [s.num_cpus for s in p.stages.values()]
    assert all(c == 0.37 for c in per_gpu) and sum(per_gpu) <= 0.75 * 2.0  # 75% of 2 CPUs over 4 actors


def test_an_earlier_runs_measurements_replace_the_tables_seconds():
    measured = {"text_encoder": 0.01, "stage_1": 1.0, "stage_2": 1.0, "stage_3": 2.0}
    p = plan(load_config("if-xl"), COSTS, 2, "H200", measured=measured, measured_by="run X")
    assert p.images_per_second == pytest.approx(2 / 4.01) and p.costs_from == "run X"
    assert "costs from run X" in p.lines(10)[0]


def test_ifbatch_plan_keeps_what_set_gave(capsys):
    args = ["plan", str(EXAMPLES), "--preset", "if-xl", "--gpus", "8", "--set", "stage_3.replicas=4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "stage_3 by hand on whole GPUs; the other stages share 4 GPUs" in out
    assert "stage_3               4     1.0000      4    2.870          54.1%  (by hand)" in out
    assert f"{4 / 2.87:.3f} images/s" in out


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_the_writer_pool_keeps_up_with_four_times_the_planned_rate(fmt, gpus):
    cfg = load_config("if-xl", [f"output.image_format={fmt}"])
    p = plan(cfg, COSTS, gpus, "H200", cpus_per_gpu=16)
    per_writer = COSTS.writers[fmt]
    assert p.writers == max(1, math.ceil(4 * p.stage_rate / per_writer))
    assert (
        p.writers * per_writer >= 4 * p.stage_rate
        and (p.writers - 1) * per_writer < 4 * p.stage_rate
        or (p.writers == 1)
    )
    assert p.images_per_second == pytest.approx(p.stage_rate)  # the writers are not the bottleneck
    assert p.apply(cfg).output.writers == p.writers and p.record()["writers"] == p.writers
    assert any(line.startswith(f"writers: {p.writers} ") for line in p.lines(100))


def test_a_writer_pool_the_cpus_cannot_hold_is_said_and_limits_the_estimate():
    cfg = load_config("if-xl", ["output.writer_cpus=2"])
    p = plan(cfg, COSTS, 64, "H200", cpus_per_gpu=2)  # 25% of 128 CPUs = 32, at 2 a writer: 16
    wanted = math.ceil(4 * p.stage_rate / COSTS.writers["png"])
    assert wanted > 16 and p.writers == 16 and "the GPU nodes' CPUs hold 16" in p.writers_short
    assert p.images_per_second == pytest.approx(min(p.stage_rate, 16 * COSTS.writers["png"]))
    kept = plan(load_config("if-xl", ["output.writers=3"]), COSTS, 8, "H200", explicit=frozenset({"output.writers"}))
    assert kept.writers == 3 and kept.apply(cfg).output.writers == 3


def test_the_tiny_cascades_small_images_need_fewer_writers():
    """Writer rates are per 1024 px image; the tiny cascade's 256 px images cost a sixteenth."""
    tiny = load_config("tiny")
    p = plan(tiny, COSTS, 1, "H200", cpus_per_gpu=2)
    assert p.writer_rate == pytest.approx(16 * COSTS.writers["png"])
    assert p.writers == max(1, math.ceil(4 * p.stage_rate / p.writer_rate)) == 1 and not p.writers_short
