"""Place a run's stages on the Ray cluster it is connected to: plan (tasks/stream/planner.py) from the cluster's
GPUs, the cost table or an earlier run's measurements, and the user's explicit settings; reserve the plan's
placement groups; or say why the stages run as configured. When the costs are estimates (a GPU kind the table has
not measured), the run's first images are timed and the run re-planned from them (Calibration)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ifbatch.configs import ConfigError
from ifbatch.configs.costs import load_costs
from ifbatch.configs.schema import STAGES, CascadeConfig

from ...outputs.records import measured_costs
from ...storage import Location
from ..plan import Plan, PlanError
from ..planner import plan
from .cluster import DEFAULT_KIND, ClusterChanged, ClusterGpus, NodeWatch, cluster_gpus, release, reserve


@dataclass
class Placement:
    cfg: CascadeConfig  # the config the pipeline runs with: the plan applied
    plan: Plan | None
    record: dict  # for the run record: the plan, or why there is none
    lines: list[str]  # for the log at the start of the run
    groups: dict = field(default_factory=dict)  # {stage: placement group}
    watch: NodeWatch | None = None
    cluster: ClusterGpus | None = None  # the cluster's GPU nodes as the plan found them

    def failed(self, error: BaseException) -> BaseException:
        """The error to report for a stream that failed: the lost node when that was the cause."""
        lost = self.watch.lost if self.watch else None
        if lost is None and self.watch is not None and self.groups:
            try:
                lost = self.watch.check()
            except Exception:  # the cluster is unreachable: the stream's own error says it
                lost = None
        if lost:
            return ClusterChanged(
                f"{lost} mid-run, so the run stopped; a rerun plans for the GPUs that remain "
                f"(stream error: {type(error).__name__}: {' '.join(str(error).split())[:300]})"
            )
        return error


def _unplanned(cfg: CascadeConfig, mode: str, reason: str) -> Placement:
    return Placement(cfg, None, {"mode": mode, "reason": reason}, [f"plan: {mode}: {reason}"])


def make_plan(
    cfg: CascadeConfig,
    explicit: frozenset[str],
    images: int,
    loc: Location | None,
    measured: tuple[dict[str, float], str] | None = None,
    cluster: ClusterGpus | None = None,
) -> Placement:
    """The placement for this run on the connected cluster (nothing reserved yet). measured: seconds per image per
    stage and where they come from (this run's first images), else an earlier run's into the same output.
    cluster: the cluster as already read (else it is read now)."""
    if cfg.plan.mode == "manual":
        return _unplanned(cfg, "manual", "plan.mode=manual, the stages run as the config places them")
    cluster = cluster or cluster_gpus()
    if cluster.total == 0:
        return _unplanned(cfg, "none", "the Ray cluster has no GPUs, the stages run as the config places them")
    if cluster.gpus == 0:
        raise PlanError(
            f"every GPU of the Ray cluster ({cluster.shape()}) is held, in whole or in part, by other jobs; "
            f"wait for them, or free some"
        )
    kind = cfg.plan.gpu_kind or cluster.kind or DEFAULT_KIND
    if measured is None and loc is not None and cfg.plan.use_measured:
        measured = measured_costs(loc, cfg)
    try:
        costs = load_costs(cfg.plan.costs, cfg.plan.gpu_tflops)
        p = plan(
            cfg,
            costs,
            cluster.gpus,
            kind,
            explicit=explicit,
            measured=measured[0] if measured else None,
            measured_by=measured[1] if measured else "",
            cpus_per_gpu=cluster.cpus_per_gpu,
            memory_gb=cfg.plan.gpu_memory_gb or cluster.memory_gb,
        )
    except ConfigError as e:  # no costs for these models: run as configured, and say so
        return _unplanned(cfg, "none", f"{e}; the stages run as the config places them")
    lines = p.lines(images)
    lines.insert(1, f"cluster: {cluster.shape()}")
    if cluster.kind is None and not cfg.plan.gpu_kind:
        lines.insert(1, f"(the cluster does not say what its GPUs are; planned as {kind}, set plan.gpu_kind)")
    nodes = [{"node": n.node_id[:12], "free": n.gpus, "gpus": n.total, "memory_gb": n.memory_gb} for n in cluster.nodes]
    return Placement(p.apply(cfg), p, p.record() | {"cluster": nodes}, lines, cluster=cluster)


@contextlib.contextmanager
def placed(cfg: CascadeConfig, explicit: frozenset[str], images: int, loc: Location | None) -> Iterator[Placement]:
    """make_plan, then hold its placement groups for the run and release them after."""
    placement = make_plan(cfg, explicit, images, loc)
    if placement.plan is not None:
        placement.groups = reserve(placement.plan, placement.cluster.nodes)
    try:
        with NodeWatch(placement.groups) as placement.watch:
            yield placement
    finally:
        release(placement.groups)


@dataclass
class Calibration:
    """Corrects a plan made from estimated costs (a GPU kind the cost table has not measured) with the run's own
    per-stage seconds, once `images` images have come out. A plan of one GPU group keeps its placement (every GPU
    runs every stage whatever the costs): its estimate, bottleneck and writers' rate are corrected mid-stream. A plan
    split over several groups deals its GPUs by the costs: the run makes its first images as a phase of its own,
    then re-plans and reserves again for the rest (its stage actors start again), when the split changed."""

    placement: Placement
    cfg: CascadeConfig  # as the user gave it (before the plan was applied)
    explicit: frozenset[str]
    images: int  # the table's
    at: int  # images to time first
    lines: list[str] = field(default_factory=list)  # what to log, once calibrated
    done: bool = False

    @classmethod
    def of(cls, placement: Placement, cfg: CascadeConfig, explicit: frozenset[str], images: int) -> Calibration:
        p = placement.plan
        at = 0
        if p is not None and p.estimated and cfg.plan.calibrate:
            at = 2 * max(s.replicas * s.batch_size for s in p.stages.values())  # two full batches on every replica
            at = at if images >= 4 * at else 0  # too small a table to be worth a second phase
        return cls(placement, cfg, explicit, images, at, done=at == 0)

    @property
    def phased(self) -> bool:
        """The first images run as a phase of their own (the plan's split depends on the costs)."""
        return not self.done and len(self.placement.plan.groups) > 1

    def first_rows(self, rows: pa.Table) -> int:
        """How many rows make the first `at` images."""
        per_row = pc.list_value_length(rows.column("images")).to_numpy(zero_copy_only=False)
        return int(np.searchsorted(np.cumsum(per_row), self.at) + 1)

    def __call__(self, result) -> None:
        """After each batch out of the stream (result: the PipelineResult so far): a plan of one group is corrected
        as soon as `at` images are out. (A phased plan is corrected between its phases: calibrate.)"""
        if not self.done and not self.phased and result.done + result.failed >= self.at:
            self.calibrate(result)

    def calibrate(self, result) -> None:
        """Plan again from the per-stage seconds of the images made so far; when the run is phased and the new plan
        deals the GPUs otherwise, release the old groups and reserve the new ones (no stage actor holds them
        between two phases)."""
        made = result.done + result.failed
        phased = self.phased
        self.done = True
        if made == 0:
            return
        seconds = {s: (result.stage_seconds.get(s) or 0.0) / made for s in STAGES}
        measured = (seconds, f"this run's first {made} images (the table's were estimates)")
        old = self.placement
        new = make_plan(self.cfg, self.explicit, self.images, None, measured=measured, cluster=old.cluster)
        calibrated = {"images": made, "estimated": old.record, "seconds_per_image": seconds}
        moved = phased and new.plan is not None and _placement(new.plan) != _placement(old.plan)
        if moved:  # the next phase runs under the new plan's groups
            release(old.groups)
            old.groups = reserve(new.plan, new.cluster.nodes)
            if old.watch is not None:
                old.watch.groups = old.groups
            old.cfg = new.cfg
        else:  # the stages keep running as they are: the writer pool too
            new.plan = replace(new.plan, writers=old.plan.writers)
        old.plan = new.plan
        old.record = new.plan.record() | {"cluster": old.record.get("cluster"), "calibration": calibrated}
        verb = "the GPUs are dealt again for the rest" if moved else "the placement stays"
        self.lines = [f"re-planned from this run's first {made} images ({verb}):", *new.plan.lines(self.images)]


def _placement(p: Plan) -> tuple:
    """What a plan reserves: its groups and every stage's replicas, GPU share, CPUs and batch."""
    return (
        tuple((g.stages, g.gpus) for g in p.groups),
        tuple((k, s.replicas, s.num_gpus, s.num_cpus, s.batch_size) for k, s in sorted(p.stages.items())),
    )
