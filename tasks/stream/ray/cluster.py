"""The Ray side of a plan: what GPUs the cluster has, and the placement groups that hold a plan's packing."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..plan import Plan, PlanError

DEFAULT_KIND = "H200"  # planned as when the cluster does not say (fake GPUs, older Ray)
RESERVE_TIMEOUT_S = 15.0  # a reservation placed node by node takes well under a second, or it will not come
NODE_ID = "ray.io/node-id"  # the label every Ray node carries: a bundle is pinned to its node by it


class ClusterChanged(RuntimeError):
    """A node holding planned GPUs left the cluster mid-run."""


@dataclass(frozen=True)
class GpuNode:
    node_id: str
    gpus: int  # whole GPUs free for this run
    total: int  # GPUs the node has
    cpus: float
    kind: str | None  # as Ray reports it (resource accelerator_type:<kind>)
    memory_gb: float | None = None  # one GPU's memory as read on the node (NVML); None with fake GPUs


@dataclass(frozen=True)
class ClusterGpus:
    nodes: tuple[GpuNode, ...]  # alive nodes with GPUs

    @property
    def gpus(self) -> int:
        """Whole GPUs free for this run."""
        return sum(n.gpus for n in self.nodes)

    @property
    def total(self) -> int:
        return sum(n.total for n in self.nodes)

    @property
    def kind(self) -> str | None:
        kinds = {n.kind for n in self.nodes if n.kind}
        return next(iter(kinds)) if len(kinds) == 1 else None

    @property
    def cpus_per_gpu(self) -> float | None:
        """The fewest CPUs per GPU over the nodes that have GPUs."""
        return min((n.cpus / n.total for n in self.nodes), default=None)

    @property
    def memory_gb(self) -> float | None:
        """The smallest GPU memory read on a node (None when no node could read it)."""
        return min((n.memory_gb for n in self.nodes if n.memory_gb), default=None)

    def shape(self) -> str:
        """'8 + 4 + 2 GPUs on 3 nodes (13 free)'."""
        sizes = " + ".join(str(n.total) for n in sorted(self.nodes, key=lambda n: -n.total))
        free = f", {self.gpus} free" if self.gpus != self.total else ""
        return f"{sizes} GPUs on {len(self.nodes)} node{'s' if len(self.nodes) != 1 else ''}{free}"


def cluster_gpus() -> ClusterGpus:
    """The GPUs of the Ray cluster this process is connected to (alive nodes only): per node, how many, how many
    are free (whole GPUs no other job holds any of), its CPUs, its GPU kind and one GPU's memory as the node reads
    it."""
    import ray
    from ray._private.state import available_resources_per_node

    free = available_resources_per_node()
    alive = [n for n in ray.nodes() if n.get("Alive") and int(n.get("Resources", {}).get("GPU", 0))]
    memory = _gpu_memory_gb([n["NodeID"] for n in alive])
    nodes = []
    for node in alive:
        res = node["Resources"]
        total = int(res["GPU"])
        kinds = [k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")]
        # Ray leaves a resource out of a node's view when none of it is free: every GPU held is no GPU, not all
        # of them (a node not in the view at all, just joined, has not been reported yet: all free)
        seen = free.get(node["NodeID"])
        avail = total if seen is None else seen.get("GPU", 0.0)
        nodes.append(
            GpuNode(
                node_id=node["NodeID"],
                gpus=min(total, int(avail + 1e-6)),
                total=total,
                cpus=res.get("CPU", 0.0),
                kind=kinds[0] if len(kinds) == 1 else None,
                memory_gb=memory.get(node["NodeID"]),
            )
        )
    return ClusterGpus(tuple(nodes))


def _gpu_memory_gb(node_ids: list[str], timeout_s: float = 20.0) -> dict[str, float | None]:
    """Per node, one GPU's memory (GiB, the smallest of the node's GPUs) read with NVML on the node, by tasks that
    hold no GPU (so they run while other jobs use them), all at once; None where NVML has no GPU (fake GPUs) or the
    node does not answer in time."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_retries=0)
    def read() -> float | None:
        try:
            import ray._private.thirdparty.pynvml as nvml

            nvml.nvmlInit()
            try:
                n = nvml.nvmlDeviceGetCount()
                sizes = [nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(i)).total for i in range(n)]
            finally:
                nvml.nvmlShutdown()
        except Exception:
            return None
        return min(sizes) / 2**30 if sizes else None

    if not node_ids:
        return {}
    on = {n: NodeAffinitySchedulingStrategy(n, soft=False) for n in node_ids}
    refs = {n: read.options(scheduling_strategy=on[n]).remote() for n in node_ids}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    out = {}
    for node, ref in refs.items():
        if ref in ready:
            try:
                out[node] = ray.get(ref)
            except Exception:
                out[node] = None
        else:
            ray.cancel(ref, force=True)
            out[node] = None
    return out


def assign(p: Plan, nodes: tuple[GpuNode, ...]) -> dict[str, list[str]]:
    """Which node each of a plan's bundles goes to: {stage: [node id per bundle]}. Hand-placed replicas take their
    whole GPUs on one node each; then each GPU group takes its GPUs, the nodes with most free GPUs first; each
    stage of a group gets one bundle on each of its group's GPUs (a sliver stage: on the first)."""
    free = {n.node_id: n.gpus for n in nodes}
    order = sorted(nodes, key=lambda n: -n.gpus)
    out: dict[str, list[str]] = {}
    for stage in p.reservation_order:
        s = p.stages[stage]
        if not s.by_hand:
            continue
        out[stage] = []
        for _ in range(s.replicas):
            node = next((n.node_id for n in order if free[n.node_id] >= s.num_gpus), None)
            if node is None:
                raise PlanError(
                    f"{stage}: {s.replicas} replicas of {s.num_gpus:g} whole GPUs each do not fit the free GPUs "
                    f"of the nodes ({_free(nodes, free)}); a replica's GPUs must be on one node"
                )
            free[node] -= int(s.num_gpus)
            out[stage].append(node)
    slots = [n.node_id for n in order for _ in range(free[n.node_id])]
    if len(slots) < p.shared_gpus:
        raise PlanError(f"the plan shares {p.shared_gpus} GPUs, the nodes have {len(slots)} free: {_free(nodes, free)}")
    first = 0
    for g in p.groups:
        mine = slots[first : first + g.gpus]
        first += g.gpus
        for stage in g.stages:
            out[stage] = mine[: p.stages[stage].replicas]
    return out


def _free(nodes: tuple[GpuNode, ...], free: dict[str, int]) -> str:
    return ", ".join(f"node {n.node_id[:12]} {free[n.node_id]} of {n.total}" for n in nodes)


def reserve(p: Plan, nodes: tuple[GpuNode, ...], timeout_s: float = RESERVE_TIMEOUT_S) -> dict:
    """One placement group per stage, in the plan's reservation order, `replicas` bundles of its GPU share and CPUs
    each, every bundle pinned to the node `assign` gave it; returns {stage: placement group}. A stage's actors then
    run with PlacementGroupSchedulingStrategy(its group), so they land in exactly the planned packing.

    Why pinned: Ray's group scheduler checks a node's GPUs as one sum (seven bundles of 0.51 "fit" a node of four
    GPUs) while each fractional bundle needs room on one GPU, so an unpinned group of 0.51-GPU bundles stays pending
    on nodes of 2, 4 or 8 GPUs (measured, Ray 2.60). Pinned, each node gets no more bundles than it has GPUs."""
    from ray._private.state import available_resources_per_node
    from ray.util.placement_group import placement_group

    where = assign(p, nodes)
    groups = {}
    for stage in p.reservation_order:
        s = p.stages[stage]
        bundle = {"GPU": s.num_gpus, **({"CPU": s.num_cpus} if s.num_cpus else {})}
        pg = placement_group(
            [bundle] * s.replicas, name=f"ifbatch-{stage}", bundle_label_selector=[{NODE_ID: n} for n in where[stage]]
        )
        if not pg.wait(timeout_s):
            release(groups | {stage: pg})
            per_node = ", ".join(f"{where[stage].count(n)} on node {n[:12]}" for n in dict.fromkeys(where[stage]))
            avail = available_resources_per_node()
            now = ", ".join(
                f"node {n.node_id[:12]} {avail.get(n.node_id, {}).get('GPU', 0):g} GPUs "
                f"{avail.get(n.node_id, {}).get('CPU', 0):g} CPUs"
                for n in nodes
            )
            raise PlanError(
                f"Ray could not reserve {stage}'s {s.replicas} x {bundle} ({per_node}) in {timeout_s:.0f} s; "
                f"free now: {now}. Another job may have taken GPUs or CPUs since the plan was made: rerun, or "
                f"free them"
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
    recorded; a rerun plans for the GPUs that remain and resumes). A stage actor that was restarting when its group
    went may wait for ever all the same (seen once, in a CI run: Ray Data showed it `restarting` 10 minutes on, the
    last batch in it): when the stream has not ended `stop_after_s` after the groups went, the watch calls
    `on_lost`, which stops the stream (RaySession: its executor shut down; the stream then fails, saying why).
    A check that fails (the control store busy while a node goes) is tried again at the next tick."""

    def __init__(self, groups: dict, every_s: float = 2.0, stop_after_s: float = 20.0):
        self.groups, self.every_s, self.stop_after_s = groups, every_s, stop_after_s
        self.lost: str | None = None
        self.on_lost: Callable[[], None] | None = None
        self.stopped_stream = False  # on_lost was called: the stream did not end by itself
        self.holders: dict[str, set[str]] = {}  # stage -> the nodes its bundles were seen on
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
        failures = 0
        while not self._stop.wait(self.every_s):
            try:
                lost = self.check()
                failures = 0
            except Exception:  # the control store is busy, or the cluster itself going away (the stream says so)
                failures += 1
                if failures >= 5:
                    return
                continue
            if lost:
                self.lost = lost
                release(self.groups)
                if not self._stop.wait(self.stop_after_s) and self.on_lost is not None:
                    self.stopped_stream = True
                    self.on_lost()
                return

    def check(self) -> str | None:
        """None while every node holding the groups' bundles is alive; else which left, by id and address."""
        import ray
        from ray.util import placement_group_table

        nodes = {n["NodeID"]: n for n in ray.nodes()}  # a node that left is still listed, not alive
        alive = {i for i, n in nodes.items() if n.get("Alive")}
        for stage, pg in self.groups.items():
            table = placement_group_table(pg)
            held = self.holders.setdefault(stage, set())  # while rescheduling, Ray no longer says where: remembered
            held.update(n for n in table.get("bundles_to_node_id", {}).values() if n)
            gone = sorted(held - alive)
            if table.get("state") == "RESCHEDULING" or gone:
                which = ", ".join(_node_name(n, nodes.get(n)) for n in gone) if gone else "an unnamed node"
                return f"node {which} holding {stage}'s planned GPUs left the Ray cluster"
        return None


def _node_name(node_id: str, node: dict | None) -> str:
    """A node as an operator finds it: the id's first 12 characters (`ray list nodes` shows the whole) and its
    address."""
    address = (node or {}).get("NodeManagerAddress")
    return f"{node_id[:12]} ({address})" if address else node_id[:12]
