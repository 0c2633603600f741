"""What best of k costs: GPU-seconds per kept image with k = 1, 2, 4 candidates an image (data.candidates_per_image),
from the cost table (the planner's arithmetic on H200s) and from the cluster simulation (benchmarks/cluster_sim.py:
the real planner, placement groups and Ray Data stream, each model call replaced by a wait of its cost on a fake
GPU).

Stage I and the scorer make and score k candidates of every image; stages II and III upscale only the best, so k
candidates cost far less than k images. With a score filter (data.min_clip_score) keeping a share p of the images,
every image pays for the front of the cascade (T5, k x stage I, k x scorer) and only the kept ones for the back:
per kept image, front / p + back (the cost-table columns for p = 50% and 25%).

    python benchmarks/best_of_k.py                          # k = 1 2 4 on 1 fake GPU, 96 images each
    python benchmarks/best_of_k.py --ks 1 4 --images 16     # a quick look

The simulated columns: the fake GPU's held time per image out (what the stream made it do: k candidates at stage I,
one upscale; it equals the table when nothing more is done) and the whole run's wall time per image out, start-up
and drain included, with its ratio to k = 1 measured in the same run of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cluster_sim import simulate  # noqa: E402

from ifbatch.configs import load_config  # noqa: E402
from ifbatch.configs.costs import load_costs  # noqa: E402
from ifbatch.tasks.stream.planner import plan  # noqa: E402

FRONT = ("text_encoder", "stage_1", "scorer")  # what every image pays for, kept or filtered


def table_row(k: int, gpus: int, costs) -> dict:
    """The planner's figures for k candidates on `gpus` H200s."""
    cfg = load_config("if-xl", [f"data.candidates_per_image={k}"])
    p = plan(cfg, costs, gpus, "H200")
    front = sum(s.seconds_per_image for n, s in p.stages.items() if n in FRONT)
    back = p.seconds_per_image - front
    return dict(
        k=k,
        stages={n: s.seconds_per_image for n, s in p.stages.items()},
        gpu_seconds=p.gpu_seconds_per_image,
        vs_one=p.candidate_cost,
        images_per_hour=3600 * p.images_per_second,
        kept_half=front / 0.5 + back,
        kept_quarter=front / 0.25 + back,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4], help="candidates per image")
    p.add_argument("--gpus", type=int, default=8, help="H200s the cost-table plan is for")
    p.add_argument("--sim-gpus", type=int, default=1, help="fake GPUs of the simulated cluster (one node)")
    p.add_argument("--images", type=int, default=96, help="images each simulated run makes")
    p.add_argument("--rate", type=float, default=2.0, help="the k = 1 ideal images/s the simulation is scaled to")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    costs = load_costs()
    table = [table_row(k, args.gpus, costs) for k in args.ks]
    one = table_row(1, args.gpus, costs)["gpu_seconds"]
    scale = args.rate * one / args.sim_gpus  # k = 1's ideal on the simulated GPUs = rate
    sims = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.ks:
            sim = simulate([args.sim_gpus], args.images, scale, [f"data.candidates_per_image={k}"], tmp)
            # back in real (cost-table) seconds: the fake GPUs' held time, and the whole run's wall time (actor
            # start-up and the drain included), per image out
            sim["busy_seconds"] = sim["busy_whole"] * args.sim_gpus * sim["seconds"] / sim["images"] * scale
            sim["wall_seconds"] = args.sim_gpus * sim["seconds"] / sim["images"] * scale
            sims.append(sim)
            print(f"k = {k}: simulated {sim['images']} images in {sim['seconds']:.0f} s", flush=True)
    print()
    print(
        f"best of k on {platform.node()} ({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d')}: cost table "
        f"{args.gpus} x H200 (configs/costs_data/costs.yaml; the scorer's row an estimate); simulation "
        f"{args.sim_gpus} fake GPU, costs / {scale:.2f}, {args.images} images a run"
    )
    print(
        "| k | stage I s/image | scorer s/image | GPU-s per kept image (table) | x k = 1 | images/hour "
        f"on {args.gpus} GPUs | per kept image, filter keeps 50% | keeps 25% | simulated: GPU-busy s per kept image "
        "| simulated: GPU-s per kept image, whole run | x k = 1 | short stage I calls |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    sim_one = sims[0]["wall_seconds"] if args.ks[0] == 1 else None
    for t, s in zip(table, sims, strict=True):
        vs = f"{s['wall_seconds'] / sim_one:.2f}" if sim_one else "-"
        calls, short = s["batches"]["stage_1"]
        print(
            f"| {t['k']} | {t['stages']['stage_1']:.2f} | {t['stages'].get('scorer', 0.0):.3f} "
            f"| {t['gpu_seconds']:.2f} | {t['vs_one']:.2f} | {t['images_per_hour']:,.0f} | {t['kept_half']:.2f} "
            f"| {t['kept_quarter']:.2f} | {s['busy_seconds']:.2f} | {s['wall_seconds']:.2f} | {vs} "
            f"| {short} of {calls} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(dict(table=table, simulation=sims), default=str))


if __name__ == "__main__":
    main()
