"""What taking over a killed run's unrecorded images costs on S3: the requests and seconds of `unrecorded` (the scan a
run makes after an unclean stop, and `verify` makes always) for an output of N image files of which 1% have no
record, on a SeaweedFS server this script starts; and the same for a run after a clean stop (no scan: one LIST of
runs/). Requests are counted as the S3 client sends them.

    python benchmarks/adopt_bench.py                      # 10,000 and 50,000 images
    python benchmarks/adopt_bench.py --images 2000        # a quick look
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from ifbatch.configs import load_config  # noqa: E402
from ifbatch.tasks.outputs import adopt  # noqa: E402
from ifbatch.tasks.outputs.manifest import write_part  # noqa: E402
from ifbatch.tasks.outputs.writer import ImageWriter  # noqa: E402
from ifbatch.tasks.storage import locate  # noqa: E402
from tests.services import bench_s3  # noqa: E402

BUCKET = "adopt-bench"
BATCH = 100


def fill(uri: str, images: int, unrecorded: float) -> int:
    """`images` 16 px PNG files with their provenance, as a run's writers write them; all but `unrecorded` of them
    recorded in the manifest. Returns how many are not."""
    from tests.helpers import writer_rows

    cfg = load_config("tiny")
    pixels = np.random.default_rng(0).integers(0, 256, (BATCH, 16, 16, 3), dtype=np.uint8)

    def batch(start: int) -> pa.Table:
        b = writer_rows(pixels)
        b["id"] = np.array([f"img-{i:08d}" for i in range(start, start + BATCH)], object)
        return ImageWriter(cfg, uri)(b)

    with ThreadPoolExecutor(32) as pool:
        records = pa.concat_tables(pool.map(batch, range(0, images, BATCH)))
    keep = records.num_rows - math.ceil(records.num_rows * unrecorded)
    loc = locate(uri)
    write_part(loc, records.slice(0, keep), "killed", "{}", 0)
    return records.num_rows - keep


@contextlib.contextmanager
def counted(loc):
    """Count the S3 requests made in the block, by operation."""
    counts: collections.Counter = collections.Counter()
    loc.fs.connect() if hasattr(loc.fs, "connect") else None
    handler = lambda model, **kw: counts.update([model.name])  # noqa: E731
    loc.fs.s3.meta.events.register("before-call.s3", handler)
    try:
        yield counts
    finally:
        loc.fs.s3.meta.events.unregister("before-call.s3", handler)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, nargs="+", default=[10_000, 50_000])
    ap.add_argument("--unrecorded", type=float, default=0.01, help="share of the images without a record")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp, bench_s3(Path(tmp), BUCKET):
        for n in args.images:
            uri = f"s3://{BUCKET}/out-{n}"
            t0 = time.perf_counter()
            lost = fill(uri, n, args.unrecorded)
            print(f"  {n:,} images written ({lost} without records) in {time.perf_counter() - t0:.0f} s", flush=True)
            loc = locate(uri)
            with counted(loc) as clean:
                adopt.open_runs(loc)  # a run after a clean stop: is any run's mark left? no scan
            adopt.mark_open(loc, "killed")
            with counted(loc) as unclean:
                t0 = time.perf_counter()
                assert adopt.open_runs(loc) == ["killed"]
                units, _ = adopt.unrecorded(loc)
                seconds = time.perf_counter() - t0
            assert sum(len(u.records or []) for u in units) == lost, len(units)
            results.append(dict(images=n, unrecorded=lost, seconds=seconds, clean=dict(clean), scan=dict(unclean)))
            print(f"  scan: {seconds:.1f} s, {dict(unclean)}; after a clean stop: {dict(clean)}", flush=True)

    print(f"\nmachine: {platform.node()} ({os.cpu_count()} CPUs), {platform.platform()}; a local SeaweedFS server")
    print("\n| images | unrecorded | scan (s) | LIST | GET | HEAD | other | after a clean stop |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        s = r["scan"]
        other = sum(v for k, v in s.items() if k not in ("ListObjectsV2", "GetObject", "HeadObject"))
        clean = ", ".join(f"{v} {k}" for k, v in r["clean"].items())
        print(
            f"| {r['images']:,} | {r['unrecorded']:,} | {r['seconds']:.1f} | {s.get('ListObjectsV2', 0)} | "
            f"{s.get('GetObject', 0)} | {s.get('HeadObject', 0)} | {other} | {clean} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"unrecorded_share": args.unrecorded, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
