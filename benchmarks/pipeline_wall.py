"""Wall time of `ifbatch run` on the example table with the tiny preset, to a local folder and to S3.

Each run is a fresh `ifbatch run` process (its own local Ray cluster and temporary Prefect API, as a user's
first command gets) into an empty output. S3 is a SeaweedFS server started here (the tests' helper).
Prints a table; the split comes from the run record the run wrote (runs/<run id>.json, what the CLI's timing line
says): the run's start-up (models checked, cluster, placement), when its first image came out (the stage actors'
models loaded), its rate.

    python benchmarks/pipeline_wall.py [--repeat 1] [--skip-s3]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EXAMPLES = ROOT / "examples" / "prompts.parquet"


def run_once(output: str) -> dict:
    from tests.prefect_helpers import run_records

    exe = Path(sys.executable).with_name("ifbatch")
    t0 = time.monotonic()
    res = subprocess.run(
        [str(exe), "run", str(EXAMPLES), output, "--no-progress"], capture_output=True, text=True, timeout=1800
    )
    wall = time.monotonic() - t0
    if res.returncode != 0:
        raise SystemExit(f"ifbatch run failed ({res.returncode}):\n{res.stderr[-3000:]}")
    (record,) = run_records(output)  # an empty output: this run's
    return {
        "process_wall": wall,
        "run": record["seconds"],
        "startup": record["startup_seconds"],
        "first": record["first_image_seconds"],
        "rate": record["rows_per_second"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--skip-s3", action="store_true")
    args = p.parse_args()
    os.environ.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", HF_HUB_OFFLINE="1")
    os.environ.pop("PREFECT_API_URL", None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            rows.append(("local", run_once(f"{tmp}/out-{i}")))
        if not args.skip_s3:
            from tests.services import bench_s3

            with bench_s3(Path(tmp), "bench"):  # (this process's environment pointed at it: the runs inherit it)
                for i in range(args.repeat):
                    rows.append(("s3", run_once(f"s3://bench/out-{i}")))
    print(
        f"ifbatch run examples/prompts.parquet (36 rows, tiny preset) on {platform.node()}, "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}"
    )
    print(
        "| output | process wall s | run s | start-up (models checked, cluster, placement) s | first image after s "
        "| images/s |"
    )
    print("|---|---|---|---|---|---|")
    for where, r in rows:
        print(
            f"| {where} | {r['process_wall']:.1f} | {r['run']:.1f} | {r['startup']:.1f} | {r['first']:.1f} | "
            f"{r['rate']:.2f} |"
        )


if __name__ == "__main__":
    main()
