"""Wall time of `ifbatch run` on the example table with the tiny preset, to a local folder and to S3.

Each run is a fresh `ifbatch run` process (its own local Ray cluster and temporary Prefect API, as a user's
first command gets) into an empty output. S3 is a SeaweedFS server started here (the tests' helper).
Prints a table; the split comes from the CLI's own timing line: the run's start-up (models checked, cluster,
placement), when its first image came out (the stage actors' models loaded), its rate.

    python benchmarks/pipeline_wall.py [--repeat 1] [--skip-s3]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EXAMPLES = ROOT / "examples" / "prompts.parquet"
TIMING = re.compile(
    r"wall ([\d.]+) s: run ([\d.]+) s; start-up \(models checked, cluster, placement\) ([\d.]+) s, "
    r"first image after ([\d.]+) s \(models loaded\); ([\d.]+) images/s while generating"
)


def run_once(output: str, env: dict) -> dict:
    exe = Path(sys.executable).with_name("ifbatch")
    t0 = time.monotonic()
    res = subprocess.run(
        [str(exe), "run", str(EXAMPLES), output, "--no-progress"], capture_output=True, text=True, env=env, timeout=1800
    )
    wall = time.monotonic() - t0
    if res.returncode != 0:
        raise SystemExit(f"ifbatch run failed ({res.returncode}):\n{res.stderr[-3000:]}")
    m = TIMING.search(res.stdout)
    if m is None:
        raise SystemExit(f"no timing line in the output of ifbatch run (has it changed?):\n{res.stdout[-3000:]}")
    cli_wall, run, startup, first, rate = (float(x) for x in m.groups())
    return {"process_wall": wall, "cli_wall": cli_wall, "run": run, "startup": startup, "first": first, "rate": rate}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--skip-s3", action="store_true")
    args = p.parse_args()
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            rows.append(("local", run_once(f"{tmp}/out-{i}", env)))
        if not args.skip_s3:
            from tests.services import SeaweedS3

            s3 = SeaweedS3(Path(tmp)).start()
            try:
                env.update(
                    AWS_ENDPOINT_URL=s3.endpoint,
                    AWS_ACCESS_KEY_ID="bench",
                    AWS_SECRET_ACCESS_KEY="bench",
                    AWS_REGION="us-east-1",
                )
                import s3fs

                s3fs.S3FileSystem(endpoint_url=s3.endpoint, key="bench", secret="bench").mkdir("bench")
                for i in range(args.repeat):
                    rows.append(("s3", run_once(f"s3://bench/out-{i}", env)))
            finally:
                s3.stop()
    print(
        f"ifbatch run examples/prompts.parquet (36 rows, tiny preset) on {platform.node()}, "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}"
    )
    head = ["output", "process wall s", "run s", "start-up (models checked, cluster, placement) s"]
    print("| " + " | ".join(head) + " | first image after s | images/s |")
    print("|---|---|---|---|---|---|")
    for where, r in rows:
        print(
            f"| {where} | {r['process_wall']:.1f} | {r['run']:.1f} | {r['startup']:.1f} | {r['first']:.1f} | "
            f"{r['rate']:.2f} |"
        )


if __name__ == "__main__":
    main()
