"""The stage planner: from the cluster's GPUs and the cost table to each stage's replicas, GPU share, CPUs and
batch (a Plan: tasks/stream/plan.py). Pure arithmetic; tasks/stream/ray/cluster.py learns the cluster and reserves what
a plan says.

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

Best of k (data.candidates_per_image): stage I and the scorer make k candidates of every image, so their seconds
per image are k times their cost; the scorer's CLIP also scores every final image, so stage III's memory holds its
weights too.

A stage whose `replicas` or `num_gpus` the user set (`--set stage_3.replicas=4`) is placed as set, on whole GPUs
reserved first; the planner spreads the other stages over the GPUs left. A `batch_size` or `num_cpus` the user
set is kept. `plan.mode: manual` turns the planner off (the config's placement as written).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace

from ifbatch.configs.costs import CostTable, StageCost
from ifbatch.configs.loader import ConfigError
from ifbatch.configs.schema import SECTIONS, CascadeConfig
from ifbatch.models.params import PARAMS, StageParams

from .plan import GpuGroup, Plan, PlanError, StagePlan

PRECISION = 4  # Ray keeps GPU fractions to 4 decimals
MARGIN = 0.01  # over half of what is left
MEMORY_HEADROOM = 0.9  # of a GPU's memory a plan may count on (CUDA context, fragmentation)
CPU_SHARE = 0.75  # of a GPU node's CPUs the stage actors may reserve; the rest is for the writer and Ray Data
SLIVER = 0.25  # a stage needing less than this many GPUs' time in all gets a single actor
WRITER_HEADROOM = 4.0  # the writer pool is sized to sustain this many times the GPUs' planned rate
WRITER_PX = 1024  # the image side the cost table's writer rates were measured at
BY_HAND = ("replicas", "num_gpus")  # set by the user, these place the stage by hand


def _steps_ratio(cfg: CascadeConfig, stage: str) -> float:
    """Costs are measured at the schema's default steps; a stage's time grows with its steps."""
    if stage not in PARAMS:
        return 1.0
    section = getattr(cfg, stage)
    return StageParams.of(section).steps / StageParams.of(type(section)()).steps


def candidates(cfg: CascadeConfig, stage: str) -> int:
    """Images a stage makes or scores per image out: k for stage I and the scorer (best of k), else 1."""
    return cfg.data.candidates_per_image if SECTIONS[stage].per_candidate else 1


def scorer_cost(cfg: CascadeConfig, costs: CostTable, kind: str) -> tuple[StageCost | None, str]:
    """The scorer's cost, and a note when it is costed as the default CLIP (a CLIP the table has not measured);
    (None, "") when the run has no scorer."""
    if cfg.scorer.source is None:
        return None, ""
    try:
        return costs.cost(kind, "scorer", model_key(cfg, "scorer")), ""
    except ConfigError:
        default = type(cfg.scorer)().source
        note = f"scorer {cfg.scorer.source!r} is not in the cost table: costed as {default}"
        return costs.cost(kind, "scorer", default), note


def model_key(cfg: CascadeConfig, stage: str) -> str:
    """The cost table's name for a stage's model: its source, or `tiny/<sub>` for the generated tiny cascade
    (planned as the cascade it stands in for, so a cluster of fake GPUs gets the real plan's shape)."""
    source = getattr(cfg, stage).source
    sub = SECTIONS[stage].tiny_subdir
    if cfg.tiny is not None and source == f"{cfg.tiny.dir.rstrip('/')}/{sub}":
        return f"tiny/{sub}"
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
    kind = how.kind  # the table's spelling (`h100` -> H100)
    memory = memory_gb or how.memory_gb
    if memory is None:
        raise PlanError(
            f"GPU kind {kind!r} is not in the cost table and its memory could not be read on the node; set "
            f"plan.gpu_memory_gb (e.g. --set plan.gpu_memory_gb=48), or add {kind} to the table's gpus"
        )
    run_stages = cfg.stages  # the scorer only when the run chooses
    scorer, scorer_note = scorer_cost(cfg, costs, kind)
    table: dict[str, StageCost] = {
        s: scorer if s == "scorer" else costs.cost(kind, s, model_key(cfg, s)) for s in run_stages
    }
    sections = {s: getattr(cfg, s) for s in run_stages}
    is_set = lambda stage, key: f"{stage}.{key}" in explicit  # noqa: E731
    batch = {s: sections[s].batch_size if is_set(s, "batch_size") else table[s].batch_size for s in run_stages}
    seconds = {s: table[s].seconds_per_image * _steps_ratio(cfg, s) * candidates(cfg, s) for s in run_stages}
    if measured:
        seconds |= {s: v for s, v in measured.items() if s in seconds and v > 0}
    total = sum(seconds.values())
    cap = MEMORY_HEADROOM * memory

    hand = [s for s in run_stages if any(is_set(s, k) for k in BY_HAND)]
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
    planned = [s for s in run_stages if s not in hand]
    if planned and shared < 1:
        taken = ", ".join(f"{s}: {sections[s].replicas} x {hand_gpus[s]:g} GPU" for s in hand)
        raise PlanError(
            f"the stages placed by hand ({taken}) "
            f"take {used_by_hand} of the cluster's {gpus} GPUs, leaving none for {', '.join(planned)}"
        )

    def weights(s: str) -> float:
        final_scores = scorer.weights_gb if s == "stage_3" and scorer is not None else 0.0  # every final image's
        return table[s].weights_gb + final_scores

    def mem(s: str) -> float:
        return weights(s) + table[s].activations_gb * batch[s] / table[s].batch_size

    notes = [scorer_note] if scorer_note else []
    for s in run_stages:  # a stage too large for one GPU at its batch runs at the largest batch that fits
        if mem(s) <= cap * (hand_gpus.get(s, 1.0)):
            continue
        if s in hand or is_set(s, "batch_size") or table[s].activations_gb == 0:
            raise PlanError(
                f"{s} needs {mem(s):.1f} GB at batch {batch[s]}, more than {MEMORY_HEADROOM:.0%} of a {kind}'s "
                f"{memory:g} GB; give it a smaller batch (--set {s}.batch_size=...)"
            )
        per_image = table[s].activations_gb / table[s].batch_size
        fits = math.floor((cap - weights(s)) / per_image)
        if fits < 1:
            raise PlanError(
                f"{s} needs {weights(s) + per_image:.1f} GB at batch 1, more than {MEMORY_HEADROOM:.0%} of "
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
    for s in run_stages:
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
        costs_from=measured_by or how.source + _unmeasured(table),
        estimated=how.estimated and not measured,
        notes=tuple(notes),
        candidates=cfg.data.candidates_per_image,
    )
    return _with_writers(p, cfg, costs, "output.writers" in explicit, cpus_per_gpu)


def _unmeasured(table: dict[str, StageCost]) -> str:
    """What a plan from the table says of the rows it used that the table marks as worked out, not measured."""
    rows = [s for s, c in table.items() if not c.measured]
    return f"; estimate: {', '.join(rows)} {'is' if len(rows) == 1 else 'are'} not measured" if rows else ""


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
