"""What a small run pays for the size of the output it writes into: the seconds of resume's read of what is done
(`drift.made_with` of the run's own images, at its start) and of the files format's end-of-run file (`Files.finish`:
images/metadata.parquet), for a 36-image run into outputs of N earlier records (synthetic: one compacted manifest
part of N `ok` file records, as a long run leaves it; the image files themselves are not needed by either step).
Each step runs in a fresh process, three times; the table gives the median.

    python benchmarks/end_of_run_bench.py                      # N = 10,000, 100,000, 1,000,000
    python benchmarks/end_of_run_bench.py --sizes 10000 100000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RUN = 36  # images of the small run


def build(out: str, n: int) -> None:
    """An output of n ok file records (one compacted part) plus the small run's own part of RUN records."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ifbatch.tasks.outputs.manifest import SCHEMA

    root = Path(out)
    (root / "manifest").mkdir(parents=True)
    models = json.dumps({s: {"source": f"DeepFloyd/{s}", "revision": "0" * 40, "dtype": "float16"} for s in "IJK"})

    def part(first: int, count: int, run_id: str) -> pa.Table:
        ids = [f"img-{i:08d}" for i in range(first, first + count)]
        cols = {
            "id": ids, "row": list(range(first, first + count)), "prompt_id": ids, "image_index": [0] * count,
            "prompt": [f"a watercolour of a lighthouse at dusk, number {i}" for i in range(first, first + count)],
            "seed": list(range(first, first + count)), "status": ["ok"] * count, "format": ["files"] * count,
            "image_uri": [f"{out}/images/{i % 256:02x}/{(i // 256) % 256:02x}/{d}.png" for i, d in
                          zip(range(first, first + count), ids, strict=True)],
            "width": [1024] * count, "height": [1024] * count, "sha256": ["0" * 64] * count,
            "bytes": [1_500_000] * count, "text_preprocessing": ["lower-strip"] * count,
            "written_at": [f"2026-12-06T00:00:00.{i % 1_000_000:06d}" for i in range(first, first + count)],
            "models": [models] * count, "run_id": [run_id] * count,
        }  # fmt: skip
        t = pa.table({f.name: cols.get(f.name, pa.nulls(count, f.type)) for f in SCHEMA}, schema=SCHEMA)
        return t

    pq.write_table(part(0, n, "20261201T000000Z-earlier"), root / "manifest" / "part-earlier.parquet")
    pq.write_table(part(n, RUN, "20261206T000000Z-small"), root / "manifest" / "part-small.parquet")


STEPS = {
    "start: what is done (resume's read)": (
        "from ifbatch.configs import load_config\n"
        "from ifbatch.tasks.outputs.drift import made_with\n"
        "from ifbatch.tasks.storage import locate\n"
        "made_with(locate(OUT), load_config('tiny'), [f'img-{i:08d}' for i in range(N, N + 36)])\n"
    ),
    "end: images/metadata.parquet": (
        "from ifbatch.tasks.outputs.formats import FORMATS\n"
        "from ifbatch.tasks.storage import locate\n"
        "FORMATS['files'].finish(locate(OUT))\n"
    ),
}


def timed(code: str, out: str, n: int) -> float:
    """Seconds of `code` in a fresh Python (imports not counted)."""
    script = (
        "import time\n"
        f"OUT, N = {out!r}, {n}\n"
        + "\n".join(line for line in code.splitlines() if line.startswith("from "))
        + "\nt0 = time.perf_counter()\n"
        + "\n".join(line for line in code.splitlines() if not line.startswith("from "))
        + "\nprint(time.perf_counter() - t0)\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}; a {RUN}-image run")
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out")
            t0 = time.perf_counter()
            build(out, n)
            built = time.perf_counter() - t0
            figures = {
                name: statistics.median(timed(code, out, n) for _ in range(args.repeat)) for name, code in STEPS.items()
            }
            rows.append((n, built, figures))
            print(f"  N = {n:,}: built in {built:.1f} s", flush=True)
    names = list(STEPS)
    print()
    print("| earlier records (N) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for n, _, figures in rows:
        print(f"| {n:,} | " + " | ".join(f"{figures[k]:.2f} s" for k in names) + " |")


if __name__ == "__main__":
    main()
