"""The stage planner: from the cluster's GPUs and the cost table to each stage's replicas, GPU share, CPUs and
batch. Pure arithmetic; tasks/stream/cluster.py learns the cluster and reserves what a plan says.

Plan "colocated": every GPU runs the whole cascade, one actor of each diffusion stage. Actors that share a GPU
take turns on its compute whatever their fractions say, so each GPU makes images at 1 / (sum of the stages'
seconds per image) and N GPUs at N / sum: the ideal, for any N, also below four GPUs. A stage whose whole load is
a sliver of its GPUs (the text encoder: 0.04% of the work) gets one actor, not one per GPU.

When the whole cascade does not fit one GPU's memory (weights plus every stage's activations at its batch; a 24 or
48 GB GPU), the stages are split into GPU groups that each fit -- say T5 + stage II on some GPUs, stage I on others,
stage III on the rest -- and the GPUs are dealt to the groups in the ratio of their costs (the fewest groups that
fit, then the best whole-GPU split). A stage too large for a GPU even alone runs at a smaller batch.

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
from collections.abc import Iterator
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
    group: int = -1  # the GPU group (Plan.groups) whose GPUs it shares; -1 when placed by hand


@dataclass(frozen=True)
class GpuGroup:
    """GPUs that each hold one actor of every stage in `stages` (a sliver stage: one actor on the first)."""

    stages: tuple[str, ...]
    gpus: int
    memory_gb: float  # needed per GPU
    seconds_per_image: float  # GPU-seconds of its stages per image

    @property
    def rate(self) -> float:
        return self.gpus / self.seconds_per_image


@dataclass(frozen=True)
class Plan:
    gpus: int  # GPUs the plan reserves
    kind: str  # the GPU kind the costs are for
    memory_gb: float  # per GPU
    groups: tuple[GpuGroup, ...]  # the planned (not hand-placed) stages' GPUs
    stages: dict[str, StagePlan]
    costs_from: str  # "the cost table (H200)", an estimate from another kind, or the run whose measurements were used
    estimated: bool = False  # costs scaled from another GPU kind: the run measures and re-plans
    writers: int = 1  # writer actors (encode and upload)
    writer_rate: float = 0.0  # images/s one writer sustains (the cost table's, for the image format); 0: unknown
    writers_short: str = ""  # why the pool is smaller than the headroom asks for, when it is
    notes: tuple[str, ...] = ()  # what the plan changed to fit (a smaller batch)

    @property
    def shared_gpus(self) -> int:
        """GPUs on which the planned stages take turns."""
        return sum(g.gpus for g in self.groups)

    @property
    def memory_needed_gb(self) -> float:
        """Per GPU, in the most loaded group."""
        return max((g.memory_gb for g in self.groups), default=0.0)

    @property
    def seconds_per_image(self) -> float:
        """GPU-seconds per image, summed over the stages."""
        return sum(s.seconds_per_image for s in self.stages.values())

    def _rates(self, writers: bool = True) -> dict[str, float]:
        """Images/s each part of the plan can make: each GPU group, each hand-placed stage alone, the writer pool."""
        rates = {f"group {i}": g.rate for i, g in enumerate(self.groups)}
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
        if not limit.startswith("group "):
            return f"{limit}, placed by hand ({self.stages[limit].replicas} replicas)"
        g = self.groups[int(limit.split()[1])]
        costliest = max(g.stages, key=lambda k: self.stages[k].share)
        if len(self.groups) == 1:
            return f"GPU compute, shared by the planned stages on every GPU ({costliest} is the costliest)"
        return f"the {g.gpus} GPU{'s' if g.gpus > 1 else ''} of {' + '.join(g.stages)} ({costliest} is the costliest)"

    @property
    def reservation_order(self) -> list[str]:
        """The order the groups are reserved in: hand-placed whole GPUs first; then group by group, each group's
        stages costliest first, so that a group fills its GPUs before the next group's bundles look for room; the
        group with a sliver stage last, its sliver very last (the only GPUs with room left are then its group's)."""

        def key(stage: str) -> tuple:
            s = self.stages[stage]
            if s.by_hand:
                return (0, 0, 0, 0, -s.num_gpus)
            g = self.groups[s.group]
            has_sliver = any(self.stages[t].replicas < g.gpus for t in g.stages)
            return (1, has_sliver, s.group, s.replicas < g.gpus, -s.num_gpus)

        return sorted(self.stages, key=key)

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
            "groups": [
                {"stages": list(g.stages), "gpus": g.gpus, "memory_gb": round(g.memory_gb, 2)} for g in self.groups
            ],
            "costs_from": self.costs_from,
            "estimated": self.estimated,
            "images_per_second": self.images_per_second,
            "bottleneck": self.bottleneck,
            "writers": self.writers,
            "writer_images_per_second": self.writer_rate,
            "notes": list(self.notes),
            "stages": {k: asdict(s) for k, s in self.stages.items()},
        }

    def how(self) -> str:
        """In words: which stages share which GPUs."""
        hand = [k for k, s in self.stages.items() if s.by_hand]
        if len(self.groups) > 1:
            split = ", ".join(f"{g.gpus} x ({' + '.join(g.stages)})" for g in self.groups)
            how = f"the cascade does not fit one GPU's memory: the GPUs are split {split}"
            return f"{', '.join(hand)} by hand on whole GPUs; {how}" if hand else how
        if hand:
            return f"{', '.join(hand)} by hand on whole GPUs; the other stages share {self.shared_gpus} GPUs"
        return "every GPU runs the whole cascade, one actor of each stage"

    def lines(self, images: int) -> list[str]:
        wall, gpu_hours = self.estimate(images)
        out = [
            f"plan: {self.gpus} x {self.kind} ({self.memory_gb:g} GB): {self.how()}; costs from {self.costs_from}",
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
        out += [f"note: {n}" for n in self.notes]
        if self.estimated:
            out.append(
                f"the costs are estimates for {self.kind}: the run times its first batches and re-plans from them"
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


def partitions(items: list[str]) -> Iterator[list[list[str]]]:
    """Every way to split `items` into non-empty groups (order kept within a group)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for p in partitions(rest):
        yield [[first], *p]
        for i in range(len(p)):
            yield [*p[:i], [first, *p[i]], *p[i + 1 :]]


def deal(seconds: list[float], gpus: int) -> list[int]:
    """Whole GPUs for groups of these costs (seconds per image): one each, then each next GPU to the slowest group.
    This maximises the slowest group's rate, gpus_g / seconds_g."""
    out = [1] * len(seconds)
    for _ in range(gpus - len(seconds)):
        slowest = min(range(len(seconds)), key=lambda i: out[i] / seconds[i])
        out[slowest] += 1
    return out


def plan(
    cfg: CascadeConfig,
    costs: CostTable,
    gpus: int,
    kind: str,
    explicit: frozenset[str] = frozenset(),
    measured: dict[str, float] | None = None,
    measured_by: str = "",
    cpus_per_gpu: float | None = None,
    memory_gb: float | None = None,
) -> Plan:
    """The plan for `gpus` GPUs of `kind`, costed from `costs` for the config's models.

    explicit: the dotted keys the user set (`stage_3.replicas`), kept as set. measured: seconds per image per
    stage from an earlier run or this run's first batches (`measured_by` names it), used instead of the table's.
    cpus_per_gpu: the GPU nodes' CPUs per GPU (the fewest), which the stage actors' CPU reservations must fit in.
    memory_gb: one GPU's memory as its node reports it (else the table's for `kind`)."""
    if gpus < 1:
        raise PlanError(f"--gpus {gpus}: a plan needs at least one GPU")
    how = costs.costed_as(kind)
    memory = memory_gb or how.memory_gb
    if memory is None:
        raise PlanError(
            f"GPU kind {kind!r} is not in the cost table and its memory could not be read on the node; set "
            f"plan.gpu_memory_gb (e.g. --set plan.gpu_memory_gb=48), or add {kind} to the table's gpus"
        )
    table: dict[str, StageCost] = {s: costs.cost(kind, s, model_key(cfg, s)) for s in STAGES}
    sections = {s: getattr(cfg, s) for s in STAGES}
    is_set = lambda stage, key: f"{stage}.{key}" in explicit  # noqa: E731
    batch = {s: sections[s].batch_size if is_set(s, "batch_size") else table[s].batch_size for s in STAGES}
    seconds = {s: table[s].seconds_per_image * _steps_ratio(cfg, s) for s in STAGES}
    if measured:
        seconds |= {s: v for s, v in measured.items() if s in seconds and v > 0}
    total = sum(seconds.values())
    cap = MEMORY_HEADROOM * memory

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

    notes = []
    for s in STAGES:  # a stage too large for one GPU at its batch runs at the largest batch that fits
        if mem(s) <= cap * (hand_gpus.get(s, 1.0)):
            continue
        if s in hand or is_set(s, "batch_size") or table[s].activations_gb == 0:
            raise PlanError(
                f"{s} needs {mem(s):.1f} GB at batch {batch[s]}, more than {MEMORY_HEADROOM:.0%} of a {kind}'s "
                f"{memory:g} GB; give it a smaller batch (--set {s}.batch_size=...)"
            )
        per_image = table[s].activations_gb / table[s].batch_size
        fits = math.floor((cap - table[s].weights_gb) / per_image)
        if fits < 1:
            raise PlanError(
                f"{s} needs {table[s].weights_gb + per_image:.1f} GB at batch 1, more than {MEMORY_HEADROOM:.0%} of "
                f"a {kind}'s {memory:g} GB: it cannot run on this GPU"
            )
        notes.append(f"{s} runs at batch {fits}, not {batch[s]}: {mem(s):.3g} GB would not fit a {memory:g} GB GPU")
        batch[s] = fits
    for s in hand:
        if mem(s) > cap * hand_gpus[s]:
            raise PlanError(f"{s} needs {mem(s):.1f} GB at batch {batch[s]}, more than its {hand_gpus[s]:g} GPU hold")

    groups = _split(planned, shared, seconds, mem, cap, kind, memory) if planned else ()
    group_of = {s: i for i, g in enumerate(groups) for s in g.stages}
    per_gpu = len(planned) + sum(1 for s in hand if hand_gpus[s])  # actors on one GPU, at most
    cpu_cap = None if cpus_per_gpu is None else math.floor(100 * CPU_SHARE * cpus_per_gpu / per_gpu) / 100

    def cpus(s: str) -> float:
        if is_set(s, "num_cpus") or cpu_cap is None:
            return sections[s].num_cpus
        return min(sections[s].num_cpus, cpu_cap)

    fractions = {}
    for g in groups:
        by_cost = sorted(g.stages, key=lambda s: -seconds[s])
        fractions |= dict(zip(by_cost, forcing_fractions(len(by_cost)), strict=True))
    stages = {}
    for s in STAGES:
        if s in hand:
            replicas, share_gpu = sections[s].replicas, hand_gpus[s]
        else:
            g = groups[group_of[s]]
            sliver = seconds[s] / g.seconds_per_image * g.gpus < SLIVER
            replicas, share_gpu = (1 if sliver else g.gpus), fractions[s]
        stages[s] = StagePlan(
            replicas=replicas,
            num_gpus=share_gpu,
            num_cpus=cpus(s),
            batch_size=batch[s],
            seconds_per_image=seconds[s],
            share=seconds[s] / total,
            by_hand=s in hand,
            group=group_of.get(s, -1),
        )
    p = Plan(
        gpus=gpus,
        kind=kind,
        memory_gb=memory,
        groups=groups,
        stages=stages,
        costs_from=measured_by or how.source,
        estimated=how.estimated and not measured,
        notes=tuple(notes),
    )
    return _with_writers(p, cfg, costs, "output.writers" in explicit, cpus_per_gpu)


def _split(planned, gpus, seconds, mem, cap, kind, memory) -> tuple[GpuGroup, ...]:
    """The GPU groups for the planned stages on `gpus` GPUs: every stage on every GPU when they fit one GPU's
    memory together; else the split into groups that each fit, with the best whole-GPU rate (fewest groups on a
    tie). Each group's GPUs are dealt in the ratio of its cost."""
    best: tuple[float, int, tuple[GpuGroup, ...]] | None = None
    for split in partitions(list(planned)):
        if len(split) > gpus or any(sum(mem(s) for s in g) > cap for g in split):
            continue
        costs = [sum(seconds[s] for s in g) for g in split]
        dealt = deal(costs, gpus)
        groups = tuple(
            GpuGroup(tuple(s for s in planned if s in g), n, sum(mem(s) for s in g), c)
            for g, n, c in zip(split, dealt, costs, strict=True)
        )
        rate = min(g.rate for g in groups)
        tie = best is not None and math.isclose(rate, best[0], rel_tol=1e-9)
        if best is None or (rate > best[0] and not tie) or (tie and len(groups) < best[1]):
            best = (rate, len(groups), groups)
    if best is None:
        need = sum(mem(s) for s in planned)
        raise PlanError(
            f"the planned stages need {need:.1f} GB at their batches and cannot be split over {gpus} GPU(s) of "
            f"{memory:g} GB ({kind}) so that each GPU's share fits {MEMORY_HEADROOM:.0%} of it; use more GPUs, "
            f"smaller batches (--set stage_N.batch_size=...), or larger GPUs"
        )
    # the GPUs' order: the largest groups first (they take whole nodes first when the GPUs are dealt to nodes)
    return tuple(sorted(best[2], key=lambda g: -g.gpus))


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
