"""The Ray side of a plan: what GPUs the cluster has, and the placement groups that hold a plan's packing."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .planner import Plan, PlanError

DEFAULT_KIND = "H200"  # planned as when the cluster does not say (fake GPUs, older Ray)


class ClusterChanged(RuntimeError):
    """A node holding planned GPUs left the cluster mid-run."""


@dataclass(frozen=True)
class ClusterGpus:
    gpus: int
    kind: str | None  # as Ray reports it (resource accelerator_type:<kind>), None when no node says
    cpus_per_gpu: float | None  # the fewest CPUs per GPU over the nodes that have GPUs
    nodes: int  # nodes with GPUs


def cluster_gpus() -> ClusterGpus:
    """The GPUs of the Ray cluster this process is connected to (alive nodes only)."""
    import ray

    gpus, kinds, ratios, nodes = 0, set(), [], 0
    for node in ray.nodes():
        res = node.get("Resources", {})
        g = int(res.get("GPU", 0))
        if not node.get("Alive") or g == 0:
            continue
        gpus += g
        nodes += 1
        ratios.append(res.get("CPU", 0) / g)
        kinds |= {k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")}
    kind = next(iter(kinds)) if len(kinds) == 1 else None
    return ClusterGpus(gpus=gpus, kind=kind, cpus_per_gpu=min(ratios) if ratios else None, nodes=nodes)


def reserve(p: Plan, timeout_s: float = 120.0) -> dict:
    """One placement group per stage, in the plan's reservation order, `replicas` bundles of its GPU share and
    CPUs each; returns {stage: placement group}. A stage's actors then run with
    PlacementGroupSchedulingStrategy(its group), so they land in exactly the planned packing."""
    import ray
    from ray.util.placement_group import placement_group

    groups = {}
    for stage in p.reservation_order:
        s = p.stages[stage]
        bundle = {"GPU": s.num_gpus, **({"CPU": s.num_cpus} if s.num_cpus else {})}
        pg = placement_group([bundle] * s.replicas, name=f"ifbatch-{stage}")
        if not pg.wait(timeout_s):
            release(groups | {stage: pg})
            raise PlanError(
                f"Ray could not reserve {s.replicas} x {bundle} for {stage} in {timeout_s:.0f} s: the cluster has "
                f"{ray.cluster_resources().get('GPU', 0):g} GPUs and {ray.cluster_resources().get('CPU', 0):g} CPUs, "
                f"{ray.available_resources().get('GPU', 0):g} GPUs free (another run holding them?)"
            )
        groups[stage] = pg
    return groups


def release(groups: dict) -> None:
    from ray.util.placement_group import remove_placement_group

    for pg in groups.values():
        try:
            remove_placement_group(pg)
        except Exception:  # already gone with its cluster
            pass


class NodeWatch:
    """Watches a plan's placement groups while a run streams. When a node holding some of their bundles dies, Ray
    keeps the groups waiting to be rescheduled and Ray Data keeps restarting the stage actors that lived there,
    each waiting for a GPU that is gone: the run would wait forever. So the watch notes which node left and
    removes the groups; their actors end, the stream fails, and the run ends saying why (rows written so far are
    recorded; a rerun plans for the GPUs that remain and resumes)."""

    def __init__(self, groups: dict, every_s: float = 2.0):
        self.groups, self.every_s = groups, every_s
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ifbatch-node-watch", daemon=True)

    def __enter__(self) -> NodeWatch:
        if self.groups:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                lost = self.check()
            except Exception:  # the cluster itself is going away: the stream will say so
                return
            if lost:
                self.lost = lost
                release(self.groups)
                return

    def check(self) -> str | None:
        import ray
        from ray.util import placement_group_table

        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        for stage, pg in self.groups.items():
            table = placement_group_table(pg)
            gone = sorted({n for n in table.get("bundles_to_node_id", {}).values() if n and n not in alive})
            if table.get("state") == "RESCHEDULING" or gone:
                nodes = ", ".join(n[:12] for n in gone) or "a node"
                return f"node {nodes} holding {stage}'s planned GPUs left the Ray cluster"
        return None
