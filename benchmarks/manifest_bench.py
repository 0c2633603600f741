"""How fast a long run's manifest is read back: seconds for `read_manifest` (resume, verify and compact all start
with it) over N parts, one reader at a time versus READERS at once, on a local folder and on S3 (a SeaweedFS
server this script starts). Each part holds a few records, as a long run's flushes do.

    python benchmarks/manifest_bench.py                          # 5,000 and 40,000 parts, folder and S3
    python benchmarks/manifest_bench.py --parts 2000 --targets folder   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402

from ifbatch.configs.schema import S3Config  # noqa: E402
from ifbatch.tasks.outputs import manifest  # noqa: E402
from ifbatch.tasks.storage import locate  # noqa: E402
from tests.services import bench_s3  # noqa: E402

BUCKET = "manifest-bench"


def part(first: int, rows: int) -> pa.Table:
    """`rows` ok records (ids first..first+rows-1), every other column null, as the writer's schema has them."""
    ids = [f"img-{i:08d}" for i in range(first, first + rows)]
    cols = {f.name: pa.nulls(rows, f.type) for f in manifest.RECORD_SCHEMA}
    cols.update(id=pa.array(ids), status=pa.array(["ok"] * rows), written_at=pa.array(["2026-12-03T00:00:00"] * rows))
    return pa.table(cols, schema=manifest.RECORD_SCHEMA)


def fill(uri: str, parts: int, rows: int) -> None:
    """Write `parts` parts (32 at once, retried while the server is busy: this is set-up, not the figure)."""
    loc = locate(uri, S3Config())
    table = part(0, rows)
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda seq: manifest.write_part(loc, table, "bench", "{}", seq), range(parts)))


def timed_read(uri: str, readers: int, endpoint: str | None = None) -> tuple[float, int]:
    """Seconds to read the manifest with `readers` at once (through `endpoint`: the latency proxy)."""
    manifest.READERS = readers
    loc = locate(uri, S3Config(endpoint_url=endpoint) if endpoint else None)
    t0 = time.perf_counter()
    t = manifest.read_manifest(loc, ["id", "status"])
    return time.perf_counter() - t0, t.num_rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=int, nargs="+", default=[5000, 40000])
    ap.add_argument("--rows", type=int, default=4, help="records per part")
    ap.add_argument("--targets", nargs="+", default=["folder", "s3", "s3+latency"])
    ap.add_argument("--latency-ms", type=float, default=20.0, help="added to each GET of the s3+latency target")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    readers = manifest.READERS
    results = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        server = stack.enter_context(bench_s3(tmp, BUCKET)) if any(t.startswith("s3") for t in args.targets) else None
        proxy = None
        if "s3+latency" in args.targets:
            from tests.services import FaultyS3Proxy

            proxy = FaultyS3Proxy(server.endpoint, delay_s=args.latency_ms / 1000)
            stack.callback(proxy.stop)
        roots = {"folder": str(tmp / "out"), "s3": f"s3://{BUCKET}", "s3+latency": f"s3://{BUCKET}"}
        for target in args.targets:
            for n in args.parts:
                uri = f"{roots[target]}/{target.replace('+', '-')}-{n}"
                fill(uri, n, args.rows)
                # every id is written once per part: the manifest reads back as `rows` ids
                via = proxy.endpoint if target == "s3+latency" else None
                serial, got = timed_read(uri, 1, via)
                parallel, got_p = timed_read(uri, readers, via)
                assert got == got_p == args.rows, (got, got_p)
                results.append({"target": target, "parts": n, "serial_s": serial, "parallel_s": parallel})
                print(f"  {target} {n} parts: 1 reader {serial:.1f} s, {readers} readers {parallel:.1f} s", flush=True)

    print(
        f"\nmachine: {platform.node()} ({os.cpu_count()} CPUs), {platform.platform()}; s3+latency: each GET "
        f"{args.latency_ms:g} ms later (a proxy), as across a network"
    )
    print(f"\n| target | parts | 1 reader (s) | {readers} readers (s) | speed-up |")
    print("|---|---|---|---|---|")
    for r in results:
        ratio = r["serial_s"] / r["parallel_s"]
        print(f"| {r['target']} | {r['parts']:,} | {r['serial_s']:.1f} | {r['parallel_s']:.1f} | {ratio:.1f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"readers": readers, "rows_per_part": args.rows, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
