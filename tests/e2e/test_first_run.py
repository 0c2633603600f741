"""The README's first command on a machine where neither Prefect, Ray nor ifbatch has run before."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers import SMALL, manifest_rows, read_bytes, sha256, write_table

# Library lines that tell a user nothing they can act on; none may reach the terminal of a default run.
NOISE = (
    "Writing model shards",
    "should be kept in float32",
    "requires torchvision",
    "Token indices sequence length",
    "constructor arguments in the object store",
    "Starting execution of Dataset",
    "Progress bars disabled",
    "Starting temporary server",
    "Error logging to API",
    "Traceback",
)
LONG = "a very detailed oil painting of " + ", ".join(f"a small red house number {i} by the sea" for i in range(12))


def fresh_machine_env(tmp_path: Path) -> dict[str, str]:
    """Empty HOME and PREFECT_HOME; none of the test session's Prefect, Ray or S3 settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_", "AWS_"))}
    for name in ("home", "prefect-home"):
        (tmp_path / name).mkdir()
    return {**env, "HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "prefect-home")}


@pytest.mark.slow
def test_first_run_on_a_fresh_machine_completes_quietly(tmp_path):
    prompts = write_table(tmp_path / "p.parquet", {"prompt": [*SMALL[:3], LONG]})
    out = tmp_path / "out"
    exe = Path(sys.executable).with_name("ifbatch")
    res = subprocess.run(
        [str(exe), "run", prompts, str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env=fresh_machine_env(tmp_path),
        cwd=tmp_path,
    )
    terminal = res.stdout + res.stderr
    assert res.returncode == 0, terminal[-4000:]
    rows = manifest_rows(str(out))
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert all(sha256(read_bytes(r["image_uri"])) == r["sha256"] for r in rows)
    assert [r["truncated"] for r in rows if r["prompt"] == LONG] == [True]  # recorded, not warned about
    assert (tmp_path / "home" / ".cache" / "ifbatch" / "tiny-cascade" / "TINY_CASCADE.json").is_file()
    assert "starting a temporary Prefect API" in terminal and "4 images done, 0 failed" in terminal
    # the timing line says when the first image came (Ray's actors load their models after the start-up)
    timing = re.search(r"placement\) ([\d.]+) s, first image after ([\d.]+) s \(models loaded\)", terminal)
    assert timing and float(timing[1]) < float(timing[2]), terminal[-2000:]
    assert [n for n in NOISE if n in terminal] == []
