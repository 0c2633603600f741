"""What the output tools cost on an output of many manifest parts: seconds and peak memory (the process's maximum
resident set) of resume's read (`done_records`), `verify` and `compact`, each in a fresh process, on a local folder
and on S3 (a SeaweedFS server this script starts). The output holds N parts of one record each (a long run that
flushed one record at a time: the worst case per part), every record an `ok` image with its (small) file.

    python benchmarks/output_tools_bench.py                          # 100,000 parts, folder and S3
    python benchmarks/output_tools_bench.py --parts 5000 --targets folder   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUCKET = "tools-bench"
TOOLS = ("resume", "verify", "compact")  # compact last: it replaces the parts


def write_parts(out: str, first: int, last: int) -> None:
    """Parts first..last-1 of the output in the folder `out`, one ok record and its image file each (plain writes:
    set-up needs no fsync, which made it ~50x slower)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ifbatch.tasks.outputs import manifest

    root = Path(out)
    models = json.dumps({s: {"source": f"DeepFloyd/{s}", "revision": "0" * 40, "dtype": "float16"} for s in "IJK"})
    for seq in range(first, last):
        image_id = f"img-{seq:08d}"
        data = f"an image, {seq}".encode()
        image = root / "images" / f"{seq % 256:02x}" / f"{image_id}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(data)
        rec = {
            "id": image_id, "row": seq, "prompt_id": image_id, "image_index": 0, "seed": seq, "status": "ok",
            "prompt": f"a watercolour of a lighthouse at dusk, number {seq}", "image_uri": str(image),
            "width": 1024, "height": 1024, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            "written_at": f"2026-12-06T00:00:00.{seq:06d}", "text_preprocessing": "card",
            "models": models, "run_id": f"20261206T000000Z-r{seq // 10_000:05d}",
        }  # fmt: skip
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([rec], schema=manifest.SCHEMA), buf, compression="zstd")
        part = root / "manifest" / f"part-{rec['run_id']}-{seq % 10_000:05d}.parquet"
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_bytes(buf.getvalue())


def fill(folder: Path, parts: int) -> None:
    workers = os.cpu_count() or 1
    step = -(-parts // workers)
    with ProcessPoolExecutor(workers) as pool:
        list(
            pool.map(
                write_parts,
                [str(folder)] * workers,
                range(0, parts, step),
                [min(parts, s + step) for s in range(0, parts, step)],
            )
        )


TOOL = """
import json, sys, time
sys.path.insert(0, {root!r})
from ifbatch.tasks.storage import locate

def peak_mb():  # this process's own peak (ru_maxrss keeps the forking parent's from before the exec)
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024

loc = locate({uri!r})
t0 = time.perf_counter()
if {tool!r} == "resume":
    from ifbatch.tasks.outputs.manifest import done_records
    out = {{"records": done_records(loc).num_rows}}
elif {tool!r} == "verify":
    from ifbatch.tasks.outputs.verify import verify
    report, _ = verify(loc)
    f = report.figures
    out = {{"whole": report.whole, "checked": report.checked, "manifest_s": f.manifest_s,
           "unrecorded_s": f.unrecorded_s, "images_s": f.images_s}}
else:
    from ifbatch.tasks.outputs.compact import compact
    written, removed = compact(loc)
    out = {{"written": len(written), "removed": len(removed)}}
out.update(seconds=time.perf_counter() - t0, peak_mb=peak_mb())
print(json.dumps(out))
"""


def run_tool(tool: str, uri: str) -> dict:
    """The tool in a fresh process (its peak memory is its own), on the environment's S3 endpoint."""
    code = TOOL.format(root=str(ROOT), uri=uri, tool=tool)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{tool} on {uri} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    from tests.services import bench_s3

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=int, default=100_000)
    ap.add_argument("--targets", nargs="+", default=["folder", "s3"], choices=["folder", "s3"])
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        fill(tmp / "out", args.parts)
        print(f"  {args.parts:,} parts and images written in {time.perf_counter() - t0:.0f} s", flush=True)
        for target in args.targets:
            with contextlib.ExitStack() as stack:
                if target == "folder":
                    uri = str(tmp / "folder")
                    shutil.copytree(tmp / "out", uri)
                else:
                    stack.enter_context(bench_s3(tmp, BUCKET, volumes=64))  # ~1.3 GB of parts and images
                    import s3fs

                    t0 = time.perf_counter()
                    s3fs.S3FileSystem().put(str(tmp / "out") + "/", f"{BUCKET}/out", recursive=True)
                    print(f"  uploaded to S3 in {time.perf_counter() - t0:.0f} s", flush=True)
                    uri = f"s3://{BUCKET}/out"
                for tool in TOOLS:
                    r = run_tool(tool, uri)
                    results.append({"target": target, "parts": args.parts, "tool": tool, **r})
                    print(f"  {target} {tool}: {r}", flush=True)

    print(f"\nmachine: {platform.node()} ({os.cpu_count()} CPUs), {platform.platform()}; S3: a local SeaweedFS server")
    print(f"\n{args.parts:,} manifest parts of one record each, every record an ok image\n")
    print("| target | tool | seconds | peak memory (MB) | of which: manifest / unrecorded / images (s) |")
    print("|---|---|---|---|---|")
    for r in results:
        split = (
            f"{r['manifest_s']:.1f} / {r['unrecorded_s']:.1f} / {r['images_s']:.1f}" if r["tool"] == "verify" else ""
        )
        print(f"| {r['target']} | {r['tool']} | {r['seconds']:.1f} | {r['peak_mb']:.0f} | {split} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"parts": args.parts, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
