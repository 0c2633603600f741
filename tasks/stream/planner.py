"""The stage planner: from N GPUs and the cost table to each stage's replicas, GPU share and batch.

Plan "colocated": every GPU runs the whole cascade, one actor of each stage. Actors that share a GPU take turns
on its compute whatever their fractions say, so each GPU makes images at 1 / (sum of the stages' seconds per
image) and N GPUs at N / sum: the ideal, for any N, also below four GPUs. The whole cascade must fit in one
GPU's memory (weights plus every stage's activations at its batch).

A fraction is only a logical reservation that Ray packs first-fit where it fits: given plain fractions, Ray put
eight text-encoder actors on GPU 0 and stage I's on GPUs 1-3 (measured, 8 fake GPUs). So each stage gets its own
placement group of N bundles, reserved costliest stage first, with fractions that admit no other packing: the
costliest takes just over half a GPU (two cannot share one), the next just over half of what is left, and so on.
On N free GPUs every GPU then holds exactly one bundle of each stage, whatever order the actors start in.
"""

from __future__ import annotations

from dataclasses import dataclass

from ifbatch.configs.costs import CostTable, StageCost
from ifbatch.configs.schema import STAGES, CascadeConfig
from ifbatch.models.params import PARAMS, StageParams

PRECISION = 4  # Ray keeps GPU fractions to 4 decimals
MARGIN = 0.01  # over half of what is left
MEMORY_HEADROOM = 0.9  # of a GPU's memory a plan may count on (CUDA context, fragmentation)


class PlanError(ValueError):
    """No plan fits: the message says which numbers, and what to do."""


@dataclass(frozen=True)
class StagePlan:
    replicas: int
    num_gpus: float
    batch_size: int
    seconds_per_image: float
    share: float  # of the work per image


@dataclass(frozen=True)
class Plan:
    gpus: int
    kind: str  # the GPU kind the costs are for
    memory_gb: float  # per GPU
    memory_needed_gb: float  # per GPU
    stages: dict[str, StagePlan]

    @property
    def seconds_per_image(self) -> float:
        """GPU-seconds per image, summed over the stages."""
        return sum(s.seconds_per_image for s in self.stages.values())

    @property
    def images_per_second(self) -> float:
        return self.gpus / self.seconds_per_image

    @property
    def reservation_order(self) -> list[str]:
        """Costliest stage first: the order the placement groups must be reserved in."""
        return sorted(self.stages, key=lambda s: -self.stages[s].num_gpus)

    def estimate(self, images: int) -> tuple[float, float]:
        """(wall seconds, GPU-hours) for `images` images."""
        wall = images / self.images_per_second
        return wall, wall * self.gpus / 3600

    def overrides(self) -> list[str]:
        """The plan as config overrides (the `--set` form)."""
        return [
            f"{stage}.{key}={value}"
            for stage, s in self.stages.items()
            for key, value in (("replicas", s.replicas), ("num_gpus", s.num_gpus), ("batch_size", s.batch_size))
        ]

    def lines(self, images: int) -> list[str]:
        wall, gpu_hours = self.estimate(images)
        costliest = max(self.stages, key=lambda k: self.stages[k].seconds_per_image)
        out = [
            f"plan: {self.gpus} x {self.kind} ({self.memory_gb:g} GB): every GPU runs the whole cascade, one actor "
            f"of each stage",
            f"{'stage':<14}{'replicas':>9}{'GPU share':>11}{'batch':>7}{'s/image':>9}{'share of work':>15}",
        ]
        for stage, s in self.stages.items():
            out.append(
                f"{stage:<14}{s.replicas:>9}{s.num_gpus:>11.4f}{s.batch_size:>7}{s.seconds_per_image:>9.3f}"
                f"{100 * s.share:>14.1f}%"
            )
        return [
            *out,
            f"bottleneck: GPU compute, shared by all stages on every GPU ({costliest} is the costliest)",
            f"estimate: {self.images_per_second:.3f} images/s = {3600 * self.images_per_second:,.0f} images/hour; "
            f"this table: {images} images in {_duration(wall)}, {gpu_hours:.3f} GPU-hours",
            f"memory per GPU: {self.memory_needed_gb:.1f} GB of {self.memory_gb:g} GB",
        ]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _steps_ratio(cfg: CascadeConfig, stage: str) -> float:
    """Costs are measured at the schema's default steps; a stage's time grows with its steps."""
    if stage not in PARAMS:
        return 1.0
    section = getattr(cfg, stage)
    return StageParams.of(section).steps / StageParams.of(type(section)()).steps


def forcing_fractions(n: int) -> list[float]:
    """n fractions, largest first, summing to at most 1, each just over half of what the larger ones leave."""
    out, left = [], 1.0
    for _ in range(n - 1):
        f = round(left / 2 + MARGIN, PRECISION)
        out.append(f)
        left = round(left - f, PRECISION)
    return [*out, left]


def plan(cfg: CascadeConfig, costs: CostTable, gpus: int, kind: str) -> Plan:
    """The colocated plan for `gpus` GPUs of `kind`, costed from `costs` for the config's models."""
    if gpus < 1:
        raise PlanError(f"--gpus {gpus}: a plan needs at least one GPU")
    stage_costs: dict[str, StageCost] = {s: costs.cost(kind, s, getattr(cfg, s).source) for s in STAGES}
    memory = costs.gpus[kind].memory_gb
    needed = sum(c.weights_gb + c.activations_gb for c in stage_costs.values())
    if needed > MEMORY_HEADROOM * memory:
        raise PlanError(
            f"the whole cascade needs {needed:.1f} GB per GPU at the batches in the cost table, more than "
            f"{MEMORY_HEADROOM:.0%} of a {kind}'s {memory:g} GB; give it smaller batches there, or place the "
            f"stages by hand (--set stage_N.num_gpus=..., stage_N.replicas=...)"
        )
    seconds = {s: c.seconds_per_image * _steps_ratio(cfg, s) for s, c in stage_costs.items()}
    total = sum(seconds.values())
    order = sorted(STAGES, key=lambda s: -seconds[s])
    fractions = dict(zip(order, forcing_fractions(len(order)), strict=True))
    stages = {
        s: StagePlan(
            replicas=gpus,
            num_gpus=fractions[s],
            batch_size=stage_costs[s].batch_size,
            seconds_per_image=seconds[s],
            share=seconds[s] / total,
        )
        for s in STAGES
    }
    return Plan(gpus=gpus, kind=kind, memory_gb=memory, memory_needed_gb=needed, stages=stages)


def reserve(p: Plan, timeout_s: float = 60.0) -> dict:
    """One placement group per stage, costliest first, `replicas` bundles of its fraction each; returns
    {stage: placement group}. Schedule a stage's actors with PlacementGroupSchedulingStrategy(its group)."""
    import ray
    from ray.util.placement_group import placement_group

    groups = {}
    for stage in p.reservation_order:
        s = p.stages[stage]
        pg = placement_group([{"GPU": s.num_gpus}] * s.replicas, name=f"ifbatch-{stage}")
        if not pg.wait(timeout_s):
            release(groups | {stage: pg})
            raise PlanError(
                f"Ray could not reserve {s.replicas} x {s.num_gpus} GPU for {stage} in {timeout_s:.0f} s: the "
                f"cluster has {ray.cluster_resources().get('GPU', 0):g} GPUs, "
                f"{ray.available_resources().get('GPU', 0):g} free"
            )
        groups[stage] = pg
    return groups


def release(groups: dict) -> None:
    from ray.util.placement_group import remove_placement_group

    for pg in groups.values():
        remove_placement_group(pg)
