"""The GPU smoke benchmark keeps working: its tiny mode runs the same code on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def benchmark(name: str, *args: str) -> subprocess.CompletedProcess:
    """`python benchmarks/<name> ARGS` as a user runs it; fails the test with its stderr when it exits non-zero."""
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_gpu_smoke_tiny_mode_prints_a_table(tmp_path):
    out = tmp_path / "table.md"
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py"), "--tiny", "--batches", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OUT": str(tmp_path)},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    table = out.read_text()
    for stage in ("text_encoder", "stage_1", "stage_2", "stage_3+safety", "all"):
        assert f"| 2 | {stage} |" in table
    assert "OOM" not in table and (tmp_path / "gpu_smoke.json").is_file()


def test_cluster_simulation_prints_its_table_with_the_plans_packing(tmp_path):
    """The cluster simulation keeps working: a run on two nodes of one GPU, on a small table, plan only, in full
    batches (the fake GPUs of different nodes are told apart: each node numbers its own from 0)."""
    out = tmp_path / "sim.json"
    args = ("--shapes", "1,1", "--images-per-gpu", "8", "--preset-images", "0", "--json", str(out))
    res = benchmark("cluster_sim.py", *args)
    assert "| 2 (1 + 1) | 5.30 | 16 | 2/2/2, 1 | one of each on 2 GPUs |" in res.stdout
    import json

    (row,) = json.loads(out.read_text())
    assert row["plan"]["images"] == 16 and 0 < row["plan"]["busy_whole"] <= 1.0
    # Every stage call is a full batch but the table's remainder: 16 images are one short stage I call (of 32),
    # one stage II call of 16, four stage III calls of 4 (blocks of 2-3 rows used to give stage III 4 + 2).
    assert row["plan"]["batches"] == {"stage_1": [1, 1], "stage_2": [1, 0], "stage_3": [4, 0]}


def test_best_of_k_benchmark_prints_the_cost_per_kept_image_from_the_table_and_the_simulation(tmp_path):
    """k = 2 on one fake GPU, a small table: the table's figures are the planner's, and the simulated stream holds
    its GPU for what the table says an image costs (k candidates at stage I, one upscale), no more. (k = 1 is the
    plain cluster simulation, above.)"""
    out = tmp_path / "bok.json"
    res = benchmark("best_of_k.py", "--ks", "2", "--images", "8", "--json", str(out))
    assert "| 2 | 3.00 | 0.004 | 6.81 | 1.28 |" in res.stdout
    import json

    figures = json.loads(out.read_text())
    for t, s in zip(figures["table"], figures["simulation"], strict=True):
        assert abs(s["busy_seconds"] / t["gpu_seconds"] - 1) < 0.1, (t, s)


def test_the_end_of_run_benchmark_prints_its_table():
    res = benchmark("end_of_run_bench.py", "--sizes", "70000", "--repeat", "1")
    import re

    row = re.search(r"^\| 70,000 \| (\d+) of (\d+) \([\d,]+ records\) \|( [\d.]+ s \|){4}$", res.stdout, re.M)
    assert row and int(row[1]) <= 36 and int(row[2]) == 256, res.stdout  # 70,000 records split 256 ways


def test_the_writer_benchmark_prints_what_content_credentials_add(tmp_path):
    out = tmp_path / "writer.json"
    args = ["--images", "2", "--size", "64", "--formats", "jpeg", "--targets", "folder", "--layouts", "files"]
    res = benchmark("writer_bench.py", *args, "--c2pa", "both", "--no-pool", "--json", str(out))
    assert "| jpeg | folder | files | off |" in res.stdout and "| jpeg | folder | files | on |" in res.stdout
    assert "What content credentials add per image" in res.stdout and "| jpeg | " in res.stdout.split("signing ms")[1]
    rates = json.loads(out.read_text())["rates"]
    assert [r["c2pa"] for r in rates] == ["off", "on"] and rates[1]["mb_per_image"] > rates[0]["mb_per_image"]
