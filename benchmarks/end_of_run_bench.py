"""What a small run pays for the size of the output it writes into: a 36-image run into outputs of N earlier records
(synthetic: N `ok` file records; the image files themselves are not needed by either step). Each step runs in a
fresh process, three times; the table gives the median, in seconds.

- start, resume's read of what is done (`drift.made_with` of the run's own 36 images): on the output as a long run
  or `ifbatch compact` leaves it (the manifest merged and split by id hash: outputs/compact.py), and on one unsplit
  part of N records (an output from an ifbatch before the split, not compacted since);
- end, the files format's metadata tables (`Files.finish`): the tables of the run's folders only
  (images/<ab>/metadata.parquet), and every table (what `verify --repair` does, and every run did before).

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


def part(out: str, first: int, count: int, run_id: str):
    """count ok file records, ids img-<first>..., as the writer makes them."""
    import pyarrow as pa

    from ifbatch.configs import load_config
    from ifbatch.tasks.outputs.images import image_relpath
    from ifbatch.tasks.outputs.manifest import SCHEMA

    out_cfg = load_config("tiny").output
    models = json.dumps({s: {"source": f"DeepFloyd/{s}", "revision": "0" * 40, "dtype": "float16"} for s in "IJK"})
    ids = [f"img-{i:08d}" for i in range(first, first + count)]
    cols = {
        "id": ids, "row": list(range(first, first + count)), "prompt_id": ids, "image_index": [0] * count,
        "prompt": [f"a watercolour of a lighthouse at dusk, number {i}" for i in range(first, first + count)],
        "seed": list(range(first, first + count)), "status": ["ok"] * count, "format": ["files"] * count,
        "image_uri": [f"{out}/{image_relpath(d, out_cfg)}" for d in ids],
        "width": [1024] * count, "height": [1024] * count, "sha256": ["0" * 64] * count,
        "bytes": [1_500_000] * count, "text_preprocessing": ["lower-strip"] * count,
        "written_at": [f"2026-12-06T00:00:00.{i % 1_000_000:06d}" for i in range(first, first + count)],
        "models": [models] * count, "run_id": [run_id] * count,
    }  # fmt: skip
    return pa.table({f.name: cols.get(f.name, pa.nulls(count, f.type)) for f in SCHEMA}, schema=SCHEMA)


def build(out: str, n: int) -> None:
    """An output of n ok file records in one unsplit part, with every metadata table."""
    import pyarrow.parquet as pq

    from ifbatch.tasks.outputs.loadable import write_image_metadata
    from ifbatch.tasks.storage import locate

    (Path(out) / "manifest").mkdir(parents=True)
    pq.write_table(part(out, 0, n, "20261201T000000Z-earlier"), Path(out, "manifest", "part-earlier-00000.parquet"))
    write_image_metadata(locate(out))


def split(out: str) -> None:
    """The same records merged and split by id hash, as `ifbatch compact` leaves them."""
    from ifbatch.tasks.outputs.compact import merge
    from ifbatch.tasks.outputs.manifest import part_paths
    from ifbatch.tasks.storage import locate

    loc = locate(out)
    (whole,) = part_paths(loc)
    merge(loc, [whole])
    os.remove(whole)


START = (
    "from ifbatch.configs import load_config\n"
    "from ifbatch.tasks.outputs.drift import made_with\n"
    "from ifbatch.tasks.storage import locate\n"
    "made_with(locate(OUT), load_config('tiny'), [f'img-{i:08d}' for i in range(N, N + 36)])\n"
)
END = (
    "from ifbatch.tasks.outputs.formats import FORMATS\n"
    "from ifbatch.tasks.storage import locate\n"
    "FORMATS['files'].finish(locate(OUT), IDS)\n"
)


def timed(code: str, out: str, n: int, ids: list[str] | None = None) -> float:
    """Seconds of `code` in a fresh Python (imports not counted)."""
    lines = code.splitlines()
    script = (
        "import time\n"
        f"OUT, N, IDS = {out!r}, {n}, {ids!r}\n"
        + "\n".join(line for line in lines if line.startswith("from "))
        + "\nt0 = time.perf_counter()\n"
        + "\n".join(line for line in lines if not line.startswith("from "))
        + "\nprint(time.perf_counter() - t0)\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def median(code: str, out: str, n: int, repeat: int, ids: list[str] | None = None) -> float:
    return statistics.median(timed(code, out, n, ids) for _ in range(repeat))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import pyarrow.parquet as pq

    from ifbatch.tasks.outputs.manifest import id_hash, part_paths, parts_of
    from ifbatch.tasks.storage import locate

    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}; a {RUN}-image run")
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out")
            t0 = time.perf_counter()
            build(out, n)
            unsplit = median(START, out, n, args.repeat)
            split(out)
            built = time.perf_counter() - t0
            loc = locate(out)
            ids = [f"img-{i:08d}" for i in range(n, n + RUN)]
            parts = part_paths(loc)
            mine = parts_of(parts, {id_hash(i) for i in ids})
            read = sum(pq.read_metadata(p).num_rows for p in mine)
            small = Path(out, "manifest", "part-small-00000.parquet")
            pq.write_table(part(out, n, RUN, "20261206T000000Z-small"), small)
            figures = {
                "start, split": median(START, out, n, args.repeat),
                "start, one unsplit part": unsplit,
                "end, the run's folders": median(END, out, n, args.repeat, ids),
                "end, every folder": median(END, out, n, args.repeat),
            }
            rows.append((n, f"{len(mine)} of {len(parts)} ({read:,} records)", figures))
            print(f"  N = {n:,}: built in {built:.1f} s", flush=True)
    names = list(rows[0][2])
    print()
    print("| earlier records (N) | parts resume reads | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for n, read, figures in rows:
        print(f"| {n:,} | {read} | " + " | ".join(f"{figures[k]:.2f} s" for k in names) + " |")


if __name__ == "__main__":
    main()
