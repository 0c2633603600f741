"""How fast the driver reads and validates a prompt table, and how much memory it keeps: rows/s and peak RSS of
`read_prompts` (tasks/inputs/prompts.py) on a generated table of N rows, each size in a fresh process.

    python benchmarks/read_bench.py                    # 100k and 1M rows
    python benchmarks/read_bench.py --rows 10000000    # 10M (about 6 GB of driver memory today)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_table(path: Path, rows: int, seed: int = 0) -> None:
    """Prompts of ~60 characters (a few thousand distinct ones), half the rows with an id and a seed."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    words = np.array("a photo of cat dog red blue castle forest boat sea snow rain painting city night".split())
    writer = None
    for start in range(0, rows, 1_000_000):
        n = min(1_000_000, rows - start)
        picks = rng.integers(0, len(words), (n, 8))
        prompt = pa.array([" ".join(w) for w in words[picks]])
        ids = pa.array([f"row-{start + i}" if i % 2 == 0 else None for i in range(n)])
        seeds = pa.array(np.where(np.arange(n) % 2 == 0, rng.integers(0, 2**62, n), -1)).cast(pa.int64())
        seeds = pa.array([s if s >= 0 else None for s in seeds.to_pylist()], pa.int64())
        t = pa.table({"prompt": prompt, "id": ids, "seed": seeds})
        writer = writer or pq.ParquetWriter(path, t.schema)
        writer.write_table(t)
    writer.close()


def measure(path: str) -> dict:
    """In this process: read_prompts on the table; seconds and peak RSS above the RSS after imports."""
    sys.path.insert(0, str(ROOT))
    from ifbatch.configs import load_config
    from ifbatch.tasks.inputs.prompts import read_prompts

    cfg = load_config("tiny")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    plan = read_prompts(path, cfg)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(rows=plan.total, valid=plan.rows.num_rows, seconds=seconds, peak_mb=(peak - base) / 1024)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: measure one table in this process
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.rows:
            path = Path(tmp) / f"t{n}.parquet"
            make_table(path, n)
            out = subprocess.run(
                [sys.executable, __file__, "--measure", str(path)], capture_output=True, text=True, check=True
            )
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  {n:,} rows: {results[-1]['seconds']:.1f} s", file=sys.stderr)
    print(f"\nread_prompts on {platform.node()} ({os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}\n")
    print("| rows | seconds | rows/s | peak driver memory above imports | per row |")
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['rows']:,} | {r['seconds']:.1f} | {r['rows'] / r['seconds']:,.0f} | {r['peak_mb']:,.0f} MB | "
            f"{1024 * r['peak_mb'] / r['rows']:.2f} KB |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
