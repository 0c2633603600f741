"""How close ifbatch's plan comes to using every GPU: a cluster simulation on a local Ray cluster with N fake GPUs.

The real pipeline runs: ifbatch's planner and placement groups (tasks/stream/ray/placing.py), its Ray Data stage
plumbing and object-store hand-off (tasks/stream/ray/executor.py, the StageActor batch logic) and its image writer.
Only each stage's model call is replaced: it waits the cost table's seconds per image x batch, divided by a scale,
while holding its fake GPU (an flock per GPU id, in 20 ms slices as processes time-slice a GPU), so actors sharing
one GPU take turns as on a real one. What travels between the fake stages has the real shapes and dtypes (77x4096 fp16
embeddings, 64 and 256 px fp16 images, 1024 px uint8), so the object store moves what a real run moves.

For each N the scale is chosen so that the ideal rate N / sum(cost / scale) equals --rate images/s: a rate the
2-core development machine can move (its plumbing, not the plan, is the limit above ~3 images/s; see
docs/performance.md). Steady state is the rate between the times 20% and 80% of the images left the writer;
the whole-run rate counts from the pipeline's start (actors starting) to its end. Today's fixed preset
(configs/if-xl.yaml with plan.mode=manual: one actor per stage, fractions of one GPU) runs beside it at the
1-GPU scale, on a shorter table.

    python benchmarks/cluster_sim.py                       # N = 1 2 3 4 8 16, 60 images per GPU
    python benchmarks/cluster_sim.py --gpus 1 2 --images-per-gpu 16 --preset-images 16   # a quick look
    python benchmarks/cluster_sim.py --shapes 4,4 4,4,4,4 8,8 8,4,2 --preset-images 0  # multi-node clusters
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ifbatch.configs import load_config  # noqa: E402
from ifbatch.configs.costs import load_costs  # noqa: E402
from ifbatch.configs.schema import CASCADE  # noqa: E402
from ifbatch.tasks.inputs.prompts import read_prompts  # noqa: E402
from ifbatch.tasks.storage import locate  # noqa: E402
from ifbatch.tasks.stream import stages as real  # noqa: E402
from ifbatch.tasks.stream.pipeline import run_pipeline  # noqa: E402
from ifbatch.tasks.stream.planner import candidates, model_key  # noqa: E402
from ifbatch.tasks.stream.ray.executor import build_dataset  # noqa: E402
from ifbatch.tasks.stream.ray.placing import placed  # noqa: E402

# A GPU shared by several processes time-slices between them at a grain of milliseconds, far finer than a model
# call. The fake GPU is held in slices of this many seconds, and a process lets waiters in between two of its own
# slices. (Slices of a tenth of each call, as first written, let a stage III call hold GPU 0 for 1.7 s at a time
# at N = 16 and the text encoder, which shares GPU 0, waited ~19 s for each 0.1 s batch: it fed every stage I
# replica, and so starved them all.)
SLICE_S = 0.02


def make_actors(seconds: dict[str, float], lock_dir: str, k: int = 0) -> dict[str, type]:
    """Stage actors whose model call waits `seconds[stage]` per image on their fake GPU (classes built here are
    pickled by value into the Ray workers). k: candidates per image when the run chooses (best of k), else 0."""

    def occupy(total: float) -> None:
        import ray

        gpu = f"{ray.get_runtime_context().get_node_id()[:8]}_{(ray.get_gpu_ids() or ['cpu'])[0]}"
        held = []
        with open(f"{lock_dir}/gpu-{gpu}.lock", "a") as f:
            left = total
            while left > 0:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    t = time.time()
                    time.sleep(min(SLICE_S, left))
                    held.append((t, time.time()))
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
                left -= held[-1][1] - held[-1][0]
                os.sched_yield()  # a waiting process gets the GPU before this one takes it again
        with open(f"{lock_dir}/busy-{gpu}-{os.getpid()}.log", "a") as log:
            log.writelines(f"{a} {b}\n" for a, b in held)

    def outputs(stage: str, n: int) -> dict[str, np.ndarray]:
        if stage == "text_encoder":
            e = np.zeros((n, 77, 4096), np.float16)
            f = np.zeros(n, bool)
            return {"prompt_embeds": e, "negative_embeds": e.copy(), "truncated": f, "negative_truncated": f.copy()}
        if stage == "stage_1" and k:
            return {
                "candidates_1": np.zeros((n, k, 3, 64, 64), np.float16),
                "candidate_seeds": np.zeros((n, k), np.int64),
            }
        if stage == "stage_1":
            return {"image_1": np.zeros((n, 3, 64, 64), np.float16)}
        if stage == "scorer":
            return {
                "image_1": np.zeros((n, 3, 64, 64), np.float16),
                "candidate": np.zeros(n, np.int16),
                "candidate_seed": np.zeros(n, np.int64),
                "candidate_scores": np.zeros((n, k), np.float32),
                "filtered": np.zeros(n, bool),
            }
        if stage == "stage_2":
            return {"image_2": np.zeros((n, 3, 256, 256), np.float16)}
        return {
            "image": np.zeros((n, 1024, 1024, 3), np.uint8),
            "nsfw": np.full(n, -1, np.int8),
            "watermark_detected": np.full(n, -1, np.int8),
            "watermarked": np.zeros(n, bool),
        }

    def init(self, cfg) -> None:
        import ray

        with open(f"{lock_dir}/actor-{os.getpid()}.json", "w") as f:
            node = ray.get_runtime_context().get_node_id()[:8]
            json.dump({"stage": self.name, "gpus": [f"{node}_{g}" for g in ray.get_gpu_ids()]}, f)

    def compute(self, batch, idx, params):
        t = time.time()
        occupy(seconds[self.name] * len(idx))
        with open(f"{lock_dir}/calls-{os.getpid()}.log", "a") as log:
            log.write(f"{self.name} {len(idx)} {t} {time.time()}\n")
        return outputs(self.name, len(idx))

    def empty(self, batch, n):
        return outputs(self.name, n)

    return {
        stage: type(
            f"Sim{base.__name__}",
            (real.StageActor,),
            {
                "name": stage,
                "drops": base.drops,
                "expands": base.expands,
                "__init__": init,
                "compute": compute,
                "empty_outputs": empty,
            },
        )
        for stage, base in ((s.name, s) for s in real.STEPS)
    }


def prompts_table(path: str, n: int) -> str:
    pq.write_table(pa.table({"prompt": [f"a simulated prompt number {i}" for i in range(n)]}), path)
    return path


@contextlib.contextmanager
def cluster(shape: list[int]):
    """A local Ray cluster of fake GPUs: one node of N GPUs, or (several numbers) a head without GPUs and a worker
    node of each size (ray.cluster_utils: each node its own raylet), as a multi-node cluster is."""
    import ray

    os.environ.setdefault("RAY_worker_niceness", "0")  # the default nice 15 starves workers on 2 cores
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Logical CPUs for the reservations (the planner fits its CPU shares to CPUs per GPU); the cores are shared.
    # Object store: 8 GiB of the 24 in all; Ray Data's per-stage budgets are shares of it.
    if len(shape) == 1:
        ray.init(
            address="local",
            num_cpus=4 + 4 * shape[0],
            num_gpus=shape[0],
            object_store_memory=8 << 30,
            include_dashboard=False,
            logging_level="ERROR",
        )
        try:
            yield
        finally:
            ray.shutdown()
        return
    from ray.cluster_utils import Cluster

    store = (8 << 30) // (len(shape) + 1)
    c = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args=dict(num_cpus=4, num_gpus=0, object_store_memory=store, include_dashboard=False),
    )
    for g in shape:
        c.add_node(num_cpus=4 * g, num_gpus=g, object_store_memory=store)
    c.wait_for_nodes(timeout=120)
    ray.init(address=c.address, logging_level="ERROR")
    try:
        yield
    finally:
        ray.shutdown()
        c.shutdown()


def simulate(shape: list[int], images: int, scale: float, overrides: list[str], tmp: str) -> dict:
    """One run on a fresh local cluster of this shape (fake GPUs per node); returns its figures."""
    from ifbatch.models.quiet import quiet_libraries

    quiet_libraries()
    cfg = load_config("if-xl", overrides)
    costs = load_costs()
    k = cfg.data.candidates_per_image
    table_seconds = {
        s: costs.cost("H200", s, model_key(cfg, s)).seconds_per_image * candidates(cfg, s) for s in cfg.stages
    }
    out = tempfile.mkdtemp(dir=tmp)
    rows = read_prompts(prompts_table(f"{out}/prompts.parquet", images), cfg).rows
    lock_dir = tempfile.mkdtemp(dir=tmp)
    gpus = sum(shape)
    with cluster(shape), placed(cfg, frozenset(), images, None) as placement:
        seconds = {s: table_seconds[s] / scale for s in cfg.stages}
        if placement.plan is not None:
            seconds = {s: placement.plan.stages[s].seconds_per_image / scale for s in cfg.stages}
        actors = make_actors(seconds, lock_dir, k if cfg.chooses else 0)
        wall0 = time.time()
        stream = lambda r, stop: build_dataset(r, placement.cfg, out, placement.groups, actors).iter_batches(  # noqa: E731
            batch_size=None, batch_format="pyarrow"
        )
        result = run_pipeline(rows, placement.cfg, locate(out), "sim", {}, stream)
    if result.failed:
        raise SystemExit(f"{result.failed} simulated rows failed: {result.errors[:3]}")
    ideal = gpus / sum(seconds.values())
    packing = _packing(lock_dir, [s for s in cfg.stages if s != "text_encoder"])
    batches = _batches(lock_dir, placement.cfg)
    t20, t80 = _window(result)
    return dict(
        gpus=gpus,
        shape=" + ".join(map(str, shape)),
        images=images,
        ideal=ideal,
        steady=result.steady_rows_per_second,
        busy=_busy(lock_dir, wall0 + t20, wall0 + t80, gpus),
        busy_whole=_busy(lock_dir, wall0, wall0 + result.seconds, gpus),
        whole=result.done / result.seconds,
        seconds=result.seconds,
        plan=placement.record,
        packing=packing,
        batches=batches,
    )


def _window(result) -> tuple[float, float]:
    """Seconds from the start at which 20% and 80% of the images had left the writer."""
    t20, _, t80, _ = result.window(min_marks=1)
    return t20, t80


def _busy(lock_dir: str, a: float, b: float, gpus: int) -> float:
    """Share of the fake GPUs' time between wall clock a and b that a stage held them."""
    held = 0.0
    for log in Path(lock_dir).glob("busy-*.log"):
        for line in log.read_text().splitlines():
            s, e = map(float, line.split())
            held += max(0.0, min(e, b) - max(s, a))
    return held / (gpus * (b - a)) if b > a else 0.0


def _batches(lock_dir: str, cfg) -> dict[str, list[int]]:
    """Per diffusion stage: [calls, calls with fewer rows than its batch size]. With blocks of one batch each
    there is at most one short call per stage (the table's remainder)."""
    out = {s: [0, 0] for s in CASCADE[1:]}
    for log in Path(lock_dir).glob("calls-*.log"):
        for line in log.read_text().splitlines():
            stage, n = line.split()[:2]
            if stage in out:
                out[stage][0] += 1
                out[stage][1] += int(n) < cfg.rows_per_call(stage)  # (best of k: batch_size // k rows)
    return out


def _packing(lock_dir: str, stages: list[str]) -> str:
    """Which stages' actors share which fake GPU (each actor wrote its GPU ids when it started): 'one of each'
    when every GPU holds exactly one actor of each diffusion stage."""
    per_gpu: dict[str, list[str]] = {}
    for f in Path(lock_dir).glob("actor-*.json"):
        a = json.loads(f.read_text())
        for g in a["gpus"]:
            per_gpu.setdefault(g, []).append(a["stage"])
    ok = all(sorted(s for s in held if s != "text_encoder") == sorted(stages) for held in per_gpu.values())
    if ok:
        return f"one of each on {len(per_gpu)} GPUs"
    return "uneven: " + "; ".join(f"GPU {g}: {sorted(held)}" for g, held in sorted(per_gpu.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16], help="one node of N GPUs, each N")
    p.add_argument(
        "--shapes",
        nargs="+",
        default=[],
        metavar="4,4",
        help="multi-node clusters instead: a head without GPUs and a node of each size, e.g. 4,4 8,4,2",
    )
    p.add_argument("--images-per-gpu", type=int, default=60)
    p.add_argument("--rate", type=float, default=2.0, help="the ideal images/s every N is scaled to")
    p.add_argument("--preset-images", type=int, default=48, help="images for today's preset (0: skip it)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    costs = load_costs()
    cfg = load_config("if-xl")
    total = sum(costs.cost("H200", s, model_key(cfg, s)).seconds_per_image for s in CASCADE)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shapes = [[int(g) for g in s.split(",")] for s in args.shapes] or [[n] for n in args.gpus]
        for shape in shapes:
            n = sum(shape)
            scale = args.rate * total / n  # ideal N / (total / scale) = rate
            plan = simulate(shape, args.images_per_gpu * n, scale, [], tmp)
            preset = None
            if args.preset_images:
                preset = simulate(shape, args.preset_images, args.rate * total, ["plan.mode=manual"], tmp)
                preset["ideal"] = n * args.rate  # N GPUs at the 1-GPU scale
            rows.append((n, scale, plan, preset))
            _print_row(n, scale, plan, preset, flush=True)
    print()
    print(
        f"cluster simulation on {platform.node()} ({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d')}; "
        f"ideal = N / sum(cost), scaled to {args.rate:g} images/s"
    )
    print(
        "| GPUs (per node) | cost ÷ | images | replicas I/II/III, T5 | packing | steady images/s | steady % of ideal "
        "| GPUs busy, steady | whole-run % of ideal | GPUs busy, whole run | short calls of all, I / II / III "
        "| today's preset: steady % / busy |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n, scale, plan, preset in rows:
        _print_row(n, scale, plan, preset)
    if args.json:
        Path(args.json).write_text(json.dumps([dict(gpus=n, scale=s, plan=a, preset=b) for n, s, a, b in rows]))


def _print_row(n, scale, plan, preset, flush=False) -> None:
    st = plan["plan"].get("stages", {})
    replicas = "/".join(str(st[s]["replicas"]) for s in CASCADE[1:]) + f", {st['text_encoder']['replicas']}"
    pre = f"{100 * preset['steady'] / preset['ideal']:.0f}% / {100 * preset['busy']:.0f}%" if preset else "-"
    short = " / ".join(f"{b} of {a}" for a, b in plan["batches"].values())
    print(
        f"| {n} ({plan['shape']}) | {scale:.2f} | {plan['images']} | {replicas} | {plan['packing']} "
        f"| {plan['steady']:.2f} "
        f"| {100 * plan['steady'] / plan['ideal']:.0f}% | {100 * plan['busy']:.0f}% "
        f"| {100 * plan['whole'] / plan['ideal']:.0f}% | {100 * plan['busy_whole']:.0f}% | {short} | {pre} |",
        flush=flush,
    )


if __name__ == "__main__":
    main()
