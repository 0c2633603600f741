"""How fast one writer encodes and writes 1024 px images: images/s per writer CPU for png / jpeg / webp, to a local
folder and to S3 (a SeaweedFS server this script starts), as files and as WebDataset shards.

A writer actor runs exactly this code (tasks/outputs/writer.py): ImageWriter per batch of stage III's size, then,
for shards, ShardWriter per shard. Here both run in this one process, one image at a time, so the rate is what one
writer CPU sustains. The planner sizes the writer pool from these figures (configs/costs_data/costs.yaml,
`writers`): enough writers for WRITER_HEADROOM x the rate it plans the GPUs for. The last table runs the real Ray
Data writer pool at 1 and 2 writers (this machine's cores) on the same images, to show the pool scaling with its
writers.

With `--c2pa both`, every measurement is made without and with C2PA content credentials (output.c2pa, a
certificate chain the script makes: tests/certs.py) in the same run, and a table gives what signing adds per image
(the signature timed alone on the same encoded images): its share of the writer's time and of one GPU's time per
image (the cost table's plan for one GPU).

    python benchmarks/writer_bench.py                     # every format, target and layout; 24 images each
    python benchmarks/writer_bench.py --images 4 --formats png --targets folder --no-pool   # a quick look
    python benchmarks/writer_bench.py --formats png jpeg --targets folder --layouts files --c2pa both --no-pool
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ifbatch.configs import load_config  # noqa: E402
from ifbatch.configs.costs import load_costs  # noqa: E402
from ifbatch.tasks.outputs.credentials import Signer, with_key_files  # noqa: E402
from ifbatch.tasks.outputs.images import encode_image  # noqa: E402
from ifbatch.tasks.outputs.writer import ImageWriter, ShardWriter  # noqa: E402
from ifbatch.tasks.stream.planner import WRITER_HEADROOM, plan  # noqa: E402
from tests.certs import make_chain  # noqa: E402
from tests.helpers import writer_rows  # noqa: E402

BUCKET = "bench"


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """n distinct images that compress like photographs: smooth shapes and gradients with a little grain (noise
    alone compresses far worse than a generated image, flat colour far better)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        img = np.zeros((size, size, 3), np.float32)
        for _ in range(6):
            cx, cy, r = rng.uniform(0, 1, 3)
            colour = rng.uniform(0, 255, 3)
            blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (0.02 + 0.1 * r))
            img += blob[..., None] * colour
        img += rng.normal(0, 4, img.shape)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def run_writer(cfg, output: str, pixels: np.ndarray, batch: int) -> tuple[float, int]:
    """Write every image as a writer actor would; (seconds, bytes written)."""
    writer = ImageWriter(cfg, output)
    shards = ShardWriter(cfg, output, "bench") if cfg.output.format == "webdataset" else None
    t0 = time.perf_counter()
    tables = [writer(writer_rows(pixels[i : i + batch])) for i in range(0, len(pixels), batch)]
    if shards is not None:
        import pyarrow as pa

        whole = pa.concat_tables(tables)
        tables = [
            shards(whole.slice(i, cfg.output.shard_samples)) for i in range(0, whole.num_rows, cfg.output.shard_samples)
        ]
    seconds = time.perf_counter() - t0
    size = sum(t.column("bytes").to_numpy(zero_copy_only=False).sum() for t in tables)
    bad = [e for t in tables for e in t.column("error").to_pylist() if e]
    if bad:
        raise SystemExit(f"the writer failed: {bad[0]}")
    return seconds, int(size)


SIGN_REPEAT = 5


def sign_ms(fmt: str, pixels: np.ndarray, signer: list[str]) -> float:
    """Milliseconds to sign one encoded image (what output.c2pa adds to a writer's work), the median over every
    image SIGN_REPEAT times: timed alone, since the difference of two writer runs is within their noise."""
    cfg = with_key_files(load_config("if-xl", [f"output.image_format={fmt}", *signer]))
    sign = Signer(cfg.output.c2pa.signing, {"stage_1": {"source": "DeepFloyd/IF-I-XL-v1.0"}})
    encoded = [encode_image(p, cfg.output, {"id": f"i{i}", "prompt": "p"}) for i, p in enumerate(pixels)]
    sign.sign(encoded[0], fmt, {"id": "warm-up"})
    times = []
    for _ in range(SIGN_REPEAT):
        for i, data in enumerate(encoded):
            t0 = time.perf_counter()
            sign.sign(data, fmt, {"id": f"i{i}"})
            times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def pool_rate(cfg, output: str, pixels: np.ndarray, writers: int) -> float:
    """Images/s through the real Ray Data writer pool of `writers` actors (tasks/stream/ray/executor.py), from the first
    batch out to the last: the pool's rate once its actors are up (their start is a run's start-up, not its rate)."""
    import ray

    from ifbatch.tasks.stream.ray.executor import _write

    rows = writer_rows(pixels)
    ds = ray.data.from_items([{k: v[i] for k, v in rows.items()} for i in range(len(pixels))])
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"writers": writers})})
    marks = []
    for b in _write(ds, cfg, output, "pool", {}).iter_batches(batch_size=None, batch_format="pyarrow"):
        marks.append((time.perf_counter(), b.num_rows))
    (t_first, first), t_last = marks[0], marks[-1][0]
    return (sum(n for _, n in marks) - first) / (t_last - t_first)


@contextlib.contextmanager
def s3_target(tmp: Path):
    from tests.services import SeaweedS3

    (tmp / "weed").mkdir()
    server = SeaweedS3(tmp / "weed").start().use(BUCKET, "bench", "bench-secret")
    try:
        yield f"s3://{BUCKET}"
    finally:
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=24, help="images per measurement")
    ap.add_argument("--pool-images", type=int, default=64, help="images through the Ray writer pool")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--formats", nargs="+", default=["png", "jpeg", "webp"])
    ap.add_argument("--targets", nargs="+", default=["folder", "s3"])
    ap.add_argument("--layouts", nargs="+", default=["files", "webdataset"])
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 64], help="plans to size the pool for")
    ap.add_argument("--no-pool", action="store_true", help="skip the Ray writer-pool table")
    ap.add_argument("--c2pa", choices=["off", "on", "both"], default="off", help="sign with content credentials")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    pixels = images(args.images, args.size)
    results = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        roots = {"folder": str(tmp / "out")}
        if "s3" in args.targets:
            roots["s3"] = stack.enter_context(s3_target(tmp))
        signer = make_chain(tmp / "certs").overrides
        for fmt in args.formats:
            for target in args.targets:
                for layout in args.layouts:
                    for c2pa in ("off", "on") if args.c2pa == "both" else (args.c2pa,):
                        sets = [f"output.image_format={fmt}", f"output.format={layout}"]
                        cfg = with_key_files(load_config("if-xl", sets + (signer if c2pa == "on" else [])))
                        out = f"{roots[target]}/{fmt}-{layout}-{c2pa}"
                        seconds, size = run_writer(cfg, out, pixels, cfg.stage_3.batch_size)
                        results.append(
                            dict(
                                format=fmt,
                                target=target,
                                layout=layout,
                                c2pa=c2pa,
                                images=len(pixels),
                                seconds=seconds,
                                images_per_second=len(pixels) / seconds,
                                mb_per_image=size / len(pixels) / 1e6,
                            )
                        )
                        rate = results[-1]["images_per_second"]
                        print(f"  {fmt} {target} {layout} c2pa {c2pa}: {rate:.2f} images/s", file=sys.stderr)
        signs = {fmt: sign_ms(fmt, pixels, signer) for fmt in args.formats} if args.c2pa == "both" else {}
        pool = []
        if not args.no_pool:
            import ray

            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            cfg = load_config("if-xl")
            for writers in (1, 2):
                pool.append(
                    dict(writers=writers, images_per_second=pool_rate(cfg, roots["folder"] + "/pool", pixels, writers))
                )
            ray.shutdown()

    print(
        f"\nWriter rates, {args.size} px, one writer CPU ({platform.node()}: {os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}), {args.images} images each\n"
    )
    print("| format | target | layout | C2PA | MB/image | images/s per writer CPU |")
    print("|---|---|---|---|---|---|")
    for r in results:
        rate = r["images_per_second"]
        print(f"| {r['format']} | {r['target']} | {r['layout']} | {r['c2pa']} | {r['mb_per_image']:.3f} | {rate:.2f} |")
    costs = load_costs()
    kind = next(iter(costs.costs))
    xl = load_config("if-xl")
    if args.c2pa == "both":
        gpu_s = 1 / plan(xl, costs, 1, kind).stage_rate  # one GPU's seconds per image (the cost table's plan)
        print(
            f"\nWhat content credentials add per image: the signature itself, timed on each format's encoded images "
            f"(median of {len(pixels)} x {SIGN_REPEAT}), against the writer's time per image unsigned (its fastest and "
            f"slowest target and layout above) and one {kind} GPU's ({gpu_s:.2f} s an image by the cost table)\n"
        )
        print(
            "| format | writer ms/image unsigned, fastest - slowest | signing ms/image | of the writer's time | "
            "of a GPU image |"
        )
        print("|---|---|---|---|---|")
        for fmt in args.formats:
            rates = [r["images_per_second"] for r in results if r["format"] == fmt and r["c2pa"] == "off"]
            fast, slow = 1e3 / max(rates), 1e3 / min(rates)
            ms = signs[fmt]
            print(
                f"| {fmt} | {fast:.1f} - {slow:.1f} | {ms:.2f} | {ms / slow:.1%} - {ms / fast:.1%} | "
                f"{ms / 1e3 / gpu_s:.3%} |"
            )
    print(
        f"\nWriters the plan needs for {WRITER_HEADROOM:g}x its rate ({kind} cost table, the slowest target and "
        "layout of each format)\n"
    )
    print("| format | slowest images/s per writer | " + " | ".join(f"{g} GPUs" for g in args.gpus) + " |")
    print("|---|---|" + "---|" * len(args.gpus))
    for fmt in args.formats:
        slowest = min(r["images_per_second"] for r in results if r["format"] == fmt)
        cells = []
        for g in args.gpus:
            rate = plan(xl, costs, g, kind).stage_rate
            cells.append(f"{math.ceil(WRITER_HEADROOM * rate / slowest)} ({rate:.2f} images/s)")
        print(f"| {fmt} | {slowest:.2f} | " + " | ".join(cells) + " |")
    if pool:
        print("\nThe Ray Data writer pool (png, folder, files): images/s with its writers\n")
        print("| writers | images/s | vs 1 writer |")
        print("|---|---|---|")
        for p in pool:
            rate = p["images_per_second"]
            print(f"| {p['writers']} | {rate:.2f} | {rate / pool[0]['images_per_second']:.2f}x |")
    if args.json:
        figures = dict(rates=results, pool=pool, signing_ms=signs, machine=platform.node())
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
