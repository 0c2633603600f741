"""The stage planner: from the cluster's GPUs and the cost table to each stage's replicas, GPU share, CPUs and
batch. Pure arithmetic; tasks/stream/cluster.py learns the cluster and reserves what a plan says.

Plan "colocated": every GPU runs the whole cascade, one actor of each diffusion stage. Actors that share a GPU
take turns on its compute whatever their fractions say, so each GPU makes images at 1 / (sum of the stages'
seconds per image) and N GPUs at N / sum: the ideal, for any N, also below four GPUs. The whole cascade must fit
in one GPU's memory (weights plus every stage's activations at its batch). A stage whose whole load is a sliver
of one GPU (the text encoder: 0.04% of the work) gets one actor, not one per GPU.

A fraction is only a logical reservation that Ray packs first-fit where it fits: given plain fractions, Ray put
eight text-encoder actors on GPU 0 and stage I's on GPUs 1-3 (measured, 8 fake GPUs). So each stage gets its own
placement group, reserved costliest stage first, with fractions that admit no other packing: the costliest takes
just over half a GPU (two cannot share one), the next just over half of what is left, and so on. On N free GPUs
every GPU then holds exactly one bundle of each stage, whatever order the actors start in.

A stage whose `replicas` or `num_gpus` the user set (`--set stage_3.replicas=4`) is placed as set, on whole GPUs
reserved first; the planner spreads the other stages over the GPUs left. A `batch_size` or `num_cpus` the user
set is kept. `plan.mode: manual` turns the planner off (the config's placement as written).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from ifbatch.configs.costs import CostTable, StageCost
from ifbatch.configs.schema import STAGES, TINY_LAYOUT, CascadeConfig
from ifbatch.models.params import PARAMS, StageParams

PRECISION = 4  # Ray keeps GPU fractions to 4 decimals
MARGIN = 0.01  # over half of what is left
MEMORY_HEADROOM = 0.9  # of a GPU's memory a plan may count on (CUDA context, fragmentation)
CPU_SHARE = 0.75  # of a GPU node's CPUs the stage actors may reserve; the rest is for the writer and Ray Data
SLIVER = 0.25  # a stage needing less than this many GPUs' time in all gets a single actor
WRITER_HEADROOM = 4.0  # the writer pool is sized to sustain this many times the GPUs' planned rate
WRITER_PX = 1024  # the image side the cost table's writer rates were measured at
PLANNED = ("replicas", "num_gpus", "num_cpus", "batch_size")  # what a plan sets per stage
BY_HAND = ("replicas", "num_gpus")  # set by the user, these place the stage by hand


class PlanError(ValueError):
    """No plan fits: the message says which numbers, and what to do."""


@dataclass(frozen=True)
class StagePlan:
    replicas: int
    num_gpus: float
    num_cpus: float
    batch_size: int
    seconds_per_image: float
    share: float  # of the work per image
    by_hand: bool = False  # placed as the user set it, on whole GPUs of its own


@dataclass(frozen=True)
class Plan:
    gpus: int  # GPUs the plan reserves
    kind: str  # the GPU kind the costs are for
    memory_gb: float  # per GPU
    memory_needed_gb: float  # per shared GPU
    shared_gpus: int  # GPUs on which the planned stages take turns
    stages: dict[str, StagePlan]
    costs_from: str  # "the cost table (H200)" or the run whose measurements were used
    writers: int = 1  # writer actors (encode and upload)
    writer_rate: float = 0.0  # images/s one writer sustains (the cost table's, for the image format); 0: unknown
    writers_short: str = ""  # why the pool is smaller than the headroom asks for, when it is

    @property
    def seconds_per_image(self) -> float:
        """GPU-seconds per image, summed over the stages."""
        return sum(s.seconds_per_image for s in self.stages.values())

    def _rates(self, writers: bool = True) -> dict[str, float]:
        """Images/s each part of the plan can make: the shared GPUs together, each hand-placed stage alone, and
        the writer pool."""
        shared = sum(s.seconds_per_image for s in self.stages.values() if not s.by_hand)
        rates = {"shared": self.shared_gpus / shared} if self.shared_gpus else {}
        for name, s in self.stages.items():
            if s.by_hand:
                rates[name] = s.replicas / s.seconds_per_image
        if writers and self.writer_rate > 0:
            rates["writers"] = self.writers * self.writer_rate
        return rates

    @property
    def stage_rate(self) -> float:
        """Images/s the GPUs can make (the writers aside): what the writer pool is sized against."""
        return min(self._rates(writers=False).values())

    @property
    def images_per_second(self) -> float:
        return min(self._rates().values())

    @property
    def bottleneck(self) -> str:
        rates = self._rates()
        limit = min(rates, key=rates.get)
        if limit == "writers":
            return f"the writers ({self.writers}, {self.writers_short or 'as set'})"
        if limit != "shared":
            return f"{limit}, placed by hand ({self.stages[limit].replicas} replicas)"
        costliest = max((k for k, s in self.stages.items() if not s.by_hand), key=lambda k: self.stages[k].share)
        return f"GPU compute, shared by the planned stages on every GPU ({costliest} is the costliest)"

    @property
    def reservation_order(self) -> list[str]:
        """Hand-placed whole GPUs first, then the costliest stage first: the order the groups are reserved in."""
        return sorted(self.stages, key=lambda s: (not self.stages[s].by_hand, -self.stages[s].num_gpus))

    def estimate(self, images: int) -> tuple[float, float]:
        """(wall seconds, GPU-hours) for `images` images."""
        wall = images / self.images_per_second
        return wall, wall * self.gpus / 3600

    def apply(self, cfg: CascadeConfig) -> CascadeConfig:
        """The config with each stage's replicas, GPU share, CPUs and batch as planned."""
        update = {
            stage: getattr(cfg, stage).model_copy(update={k: getattr(s, k) for k in PLANNED})
            for stage, s in self.stages.items()
        }
        update["output"] = cfg.output.model_copy(update={"writers": self.writers})
        return cfg.model_copy(update=update)

    def record(self) -> dict:
        """What the run record keeps: the plan and its estimate."""
        return {
            "mode": "auto",
            "gpus": self.gpus,
            "kind": self.kind,
            "memory_gb": self.memory_gb,
            "memory_needed_gb": round(self.memory_needed_gb, 2),
            "shared_gpus": self.shared_gpus,
            "costs_from": self.costs_from,
            "images_per_second": self.images_per_second,
            "bottleneck": self.bottleneck,
            "writers": self.writers,
            "writer_images_per_second": self.writer_rate,
            "stages": {k: asdict(s) for k, s in self.stages.items()},
        }

    def lines(self, images: int) -> list[str]:
        wall, gpu_hours = self.estimate(images)
        hand = [k for k, s in self.stages.items() if s.by_hand]
        how = "every GPU runs the whole cascade, one actor of each stage"
        if hand:
            how = f"{', '.join(hand)} by hand on whole GPUs; the other stages share {self.shared_gpus} GPUs"
        out = [
            f"plan: {self.gpus} x {self.kind} ({self.memory_gb:g} GB): {how}; costs from {self.costs_from}",
            f"{'stage':<14}{'replicas':>9}{'GPU share':>11}{'batch':>7}{'s/image':>9}{'share of work':>15}",
        ]
        for stage, s in self.stages.items():
            out.append(
                f"{stage:<14}{s.replicas:>9}{s.num_gpus:>11.4f}{s.batch_size:>7}{s.seconds_per_image:>9.3f}"
                f"{100 * s.share:>14.1f}%{'  (by hand)' if s.by_hand else ''}"
            )
        if self.writer_rate > 0:
            pool = self.writers * self.writer_rate
            out.append(
                f"writers: {self.writers} (~{self.writer_rate:g} images/s each): {pool:.2f} images/s, "
                f"{pool / self.stage_rate:.1f}x the GPUs' rate{'; ' + self.writers_short if self.writers_short else ''}"
            )
        return [
            *out,
            f"bottleneck: {self.bottleneck}",
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


def model_key(cfg: CascadeConfig, stage: str) -> str:
    """The cost table's name for a stage's model: its source, or `tiny/<sub>` for the generated tiny cascade
    (planned as the cascade it stands in for, so a cluster of fake GPUs gets the real plan's shape)."""
    source = getattr(cfg, stage).source
    if cfg.tiny is not None and source == f"{cfg.tiny.dir.rstrip('/')}/{TINY_LAYOUT[stage]}":
        return f"tiny/{TINY_LAYOUT[stage]}"
    return source


def output_px(cfg: CascadeConfig) -> int:
    """The side of the cascade's images: 1024 (IF-II's 256 px through the x4 upscaler); the generated tiny
    cascade's are 256. The writers' cost scales with their pixels."""
    return 256 if model_key(cfg, "stage_3").startswith("tiny/") else WRITER_PX


def forcing_fractions(n: int) -> list[float]:
    """n fractions, largest first, summing to at most 1, each just over half of what the larger ones leave."""
    out, left = [], 1.0
    for _ in range(n - 1):
        f = round(left / 2 + MARGIN, PRECISION)
        out.append(f)
        left = round(left - f, PRECISION)
    return [*out, left]


def plan(
    cfg: CascadeConfig,
    costs: CostTable,
    gpus: int,
    kind: str,
    explicit: frozenset[str] = frozenset(),
    measured: dict[str, float] | None = None,
    measured_by: str = "",
    cpus_per_gpu: float | None = None,
) -> Plan:
    """The plan for `gpus` GPUs of `kind`, costed from `costs` for the config's models.

    explicit: the dotted keys the user set (`stage_3.replicas`), kept as set. measured: seconds per image per
    stage from an earlier run (`measured_by` names it), used instead of the table's. cpus_per_gpu: the GPU
    nodes' CPUs per GPU (the fewest), which the stage actors' CPU reservations must fit in."""
    if gpus < 1:
        raise PlanError(f"--gpus {gpus}: a plan needs at least one GPU")
    table: dict[str, StageCost] = {s: costs.cost(kind, s, model_key(cfg, s)) for s in STAGES}
    memory = costs.gpus[kind].memory_gb
    sections = {s: getattr(cfg, s) for s in STAGES}
    is_set = lambda stage, key: f"{stage}.{key}" in explicit  # noqa: E731
    batch = {s: sections[s].batch_size if is_set(s, "batch_size") else table[s].batch_size for s in STAGES}
    seconds = {s: table[s].seconds_per_image * _steps_ratio(cfg, s) for s in STAGES}
    if measured:
        seconds |= {s: v for s, v in measured.items() if s in seconds and v > 0}
    total = sum(seconds.values())

    hand = [s for s in STAGES if any(is_set(s, k) for k in BY_HAND)]
    for s in hand:
        g = sections[s].num_gpus if is_set(s, "num_gpus") else 1.0
        if g < 1 or g != int(g):
            raise PlanError(
                f"{s}.num_gpus = {g:g}: a stage placed by hand gets whole GPUs (1, 2, ...) beside a plan; for "
                f"fractions of a GPU set plan.mode=manual and place every stage yourself"
            )
    hand_gpus = {s: (sections[s].num_gpus if is_set(s, "num_gpus") else 1.0) for s in hand}
    used_by_hand = sum(int(hand_gpus[s]) * sections[s].replicas for s in hand)
    shared = gpus - used_by_hand
    planned = [s for s in STAGES if s not in hand]
    if planned and shared < 1:
        taken = ", ".join(f"{s}: {sections[s].replicas} x {hand_gpus[s]:g} GPU" for s in hand)
        raise PlanError(
            f"the stages placed by hand ({taken}) "
            f"take {used_by_hand} of the cluster's {gpus} GPUs, leaving none for {', '.join(planned)}"
        )

    def mem(s: str) -> float:
        return table[s].weights_gb + table[s].activations_gb * batch[s] / table[s].batch_size

    needed = sum(mem(s) for s in planned)
    if needed > MEMORY_HEADROOM * memory:
        raise PlanError(
            f"the planned stages need {needed:.1f} GB per GPU at their batches, more than "
            f"{MEMORY_HEADROOM:.0%} of a {kind}'s {memory:g} GB; give them smaller batches "
            f"(--set stage_N.batch_size=...), or place the costliest stage by hand (--set stage_3.replicas=...)"
        )
    for s in hand:
        if mem(s) > MEMORY_HEADROOM * memory * hand_gpus[s]:
            raise PlanError(f"{s} needs {mem(s):.1f} GB at batch {batch[s]}, more than its {hand_gpus[s]:g} GPU hold")

    by_cost = sorted(planned, key=lambda s: -seconds[s])
    fractions = dict(zip(by_cost, forcing_fractions(len(by_cost)), strict=True))
    per_gpu = len(planned) + sum(1 for s in hand if hand_gpus[s])  # actors on one GPU, at most
    cpu_cap = None if cpus_per_gpu is None else math.floor(100 * CPU_SHARE * cpus_per_gpu / per_gpu) / 100

    def cpus(s: str) -> float:
        if is_set(s, "num_cpus") or cpu_cap is None:
            return sections[s].num_cpus
        return min(sections[s].num_cpus, cpu_cap)

    stages = {}
    for s in STAGES:
        if s in hand:
            replicas, share_gpu = sections[s].replicas, hand_gpus[s]
        else:
            sliver = seconds[s] / sum(seconds[p] for p in planned) * shared < SLIVER
            replicas, share_gpu = (1 if sliver else shared), fractions[s]
        stages[s] = StagePlan(
            replicas=replicas,
            num_gpus=share_gpu,
            num_cpus=cpus(s),
            batch_size=batch[s],
            seconds_per_image=seconds[s],
            share=seconds[s] / total,
            by_hand=s in hand,
        )
    p = Plan(
        gpus=gpus,
        kind=kind,
        memory_gb=memory,
        memory_needed_gb=needed,
        shared_gpus=shared if planned else 0,
        stages=stages,
        costs_from=measured_by or f"the cost table ({kind})",
    )
    return _with_writers(p, cfg, costs, "output.writers" in explicit, cpus_per_gpu)


def _with_writers(p: Plan, cfg: CascadeConfig, costs: CostTable, by_hand: bool, cpus_per_gpu: float | None) -> Plan:
    """The plan with its writer pool: enough writers for WRITER_HEADROOM x the GPUs' rate, as many as the GPU
    nodes' CPUs left to them hold (1 - CPU_SHARE of them); output.writers when the user set it."""
    rate = costs.writers.get(cfg.output.image_format, 0.0) * (WRITER_PX / output_px(cfg)) ** 2
    if by_hand:
        return replace(p, writers=cfg.output.writers or 1, writer_rate=rate)
    if rate <= 0:
        return replace(p, writers=cfg.output.writers or 1)
    needed = max(1, math.ceil(WRITER_HEADROOM * p.stage_rate / rate))
    short = ""
    if cpus_per_gpu is not None:
        room = max(1, math.floor((1 - CPU_SHARE) * cpus_per_gpu * p.gpus / cfg.output.writer_cpus))
        if room < needed:
            short = (
                f"{needed} wanted for {WRITER_HEADROOM:g}x, the GPU nodes' CPUs hold {room}; "
                f"add CPUs or lower output.writer_cpus"
            )
            needed = room
    return replace(p, writers=needed, writer_rate=rate, writers_short=short)
