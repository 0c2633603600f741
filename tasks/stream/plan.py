"""A stage plan as data: per stage its replicas, GPU share, CPUs and batch; the GPU groups the stages share; what it
can make (images/s, its bottleneck), how it reads in the log and the run record, and the config it gives. The
arithmetic that makes one is tasks/stream/planner.py."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ifbatch.configs.schema import SECTIONS, CascadeConfig

PLANNED = ("replicas", "num_gpus", "num_cpus", "batch_size")  # what a plan sets per stage


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
    candidates: int = 1  # best of k: stage I and the scorer's seconds per image are k candidates'

    @property
    def gpu_seconds_per_image(self) -> float:
        """GPU-seconds the plan spends per image out (kept, or filtered after the scorer)."""
        return self.gpus / self.images_per_second

    @property
    def candidate_cost(self) -> float:
        """How many times a run with one candidate an image (k = 1) the plan's GPU-seconds per image are: the
        stages' seconds with stage I's and the scorer's taken once, on the same GPUs (ideal)."""
        if self.candidates == 1:
            return 1.0
        once = sum(
            s.seconds_per_image / (self.candidates if SECTIONS[name].per_candidate else 1)
            for name, s in self.stages.items()
            if not SECTIONS[name].chooses_only
        )
        return self.seconds_per_image / once

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
            "candidates_per_image": self.candidates,
            "gpu_seconds_per_image": self.gpu_seconds_per_image,
            "cost_vs_one_candidate": self.candidate_cost,
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
        if self.candidates > 1:
            out.append(
                f"best of {self.candidates}: stage I and the scorer make and score {self.candidates} candidates an "
                f"image, only the best is upscaled: {self.gpu_seconds_per_image:.2f} GPU-s per kept image, "
                f"{self.candidate_cost:.2f}x one candidate an image"
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
