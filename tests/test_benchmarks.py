"""The GPU smoke benchmark keeps working: its tiny mode runs the same code on the CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_smoke_tiny_mode_prints_a_table(tmp_path):
    out = tmp_path / "table.md"
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py"), "--tiny", "--batches", "1", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OUT": str(tmp_path)},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    table = out.read_text()
    for stage in ("text_encoder", "stage_1", "stage_2", "stage_3+safety", "all"):
        assert f"| 1 | {stage} |" in table and f"| 2 | {stage} |" in table
    assert "OOM" not in table and (tmp_path / "gpu_smoke.json").is_file()
