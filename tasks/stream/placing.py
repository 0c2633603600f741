"""Place a run's stages on the Ray cluster it is connected to: plan (tasks/stream/planner.py) from the cluster's
GPUs, the cost table or an earlier run's measurements, and the user's explicit settings; reserve the plan's
placement groups; or say why the stages run as configured."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from ifbatch.configs import ConfigError
from ifbatch.configs.costs import load_costs
from ifbatch.configs.schema import CascadeConfig

from ..outputs.records import measured_costs
from ..storage import Location
from .cluster import DEFAULT_KIND, ClusterChanged, NodeWatch, cluster_gpus, release, reserve
from .planner import Plan, plan


@dataclass
class Placement:
    cfg: CascadeConfig  # the config the pipeline runs with: the plan applied
    plan: Plan | None
    record: dict  # for the run record: the plan, or why there is none
    lines: list[str]  # for the log at the start of the run
    groups: dict = field(default_factory=dict)  # {stage: placement group}
    watch: NodeWatch | None = None

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
                f"{lost} mid-run, so the run stopped; the rows finished before it are recorded. Rerun the same "
                f"command to generate the rest on the GPUs that remain "
                f"(stream error: {type(error).__name__}: {str(error)[:300]})"
            )
        return error


def _unplanned(cfg: CascadeConfig, mode: str, reason: str) -> Placement:
    return Placement(cfg, None, {"mode": mode, "reason": reason}, [f"plan: {mode}: {reason}"])


def make_plan(cfg: CascadeConfig, explicit: frozenset[str], images: int, loc: Location | None) -> Placement:
    """The placement for this run on the connected cluster (nothing reserved yet)."""
    if cfg.plan.mode == "manual":
        return _unplanned(cfg, "manual", "plan.mode=manual, the stages run as the config places them")
    cluster = cluster_gpus()
    if cluster.gpus == 0:
        return _unplanned(cfg, "none", "the Ray cluster has no GPUs, the stages run as the config places them")
    kind = cfg.plan.gpu_kind or cluster.kind or DEFAULT_KIND
    measured = measured_costs(loc, cfg) if (loc is not None and cfg.plan.use_measured) else None
    try:
        costs = load_costs(cfg.plan.costs)
        p = plan(
            cfg,
            costs,
            cluster.gpus,
            kind,
            explicit=explicit,
            measured=measured[0] if measured else None,
            measured_by=measured[1] if measured else "",
            cpus_per_gpu=cluster.cpus_per_gpu,
        )
    except ConfigError as e:  # no costs for these models or this GPU kind: run as configured, and say so
        return _unplanned(cfg, "none", f"{e}; the stages run as the config places them")
    lines = p.lines(images)
    if cluster.kind is None and not cfg.plan.gpu_kind:
        lines.insert(1, f"(the cluster does not say what its GPUs are; planned as {kind}, set plan.gpu_kind)")
    return Placement(p.apply(cfg), p, p.record(), lines)


@contextlib.contextmanager
def placed(cfg: CascadeConfig, explicit: frozenset[str], images: int, loc: Location | None) -> Iterator[Placement]:
    """make_plan, then hold its placement groups for the run and release them after."""
    placement = make_plan(cfg, explicit, images, loc)
    if placement.plan is not None:
        placement.groups = reserve(placement.plan)
    try:
        with NodeWatch(placement.groups) as placement.watch:
            yield placement
    finally:
        release(placement.groups)
