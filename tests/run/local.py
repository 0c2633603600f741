"""Runs for the run layer: the run engine (tasks/run.py) on the local executor -- every stage in one process, no
Prefect, no Ray -- in this process, or as `ifbatch run --no-prefect --set executor=local` in a subprocess (for what
needs a process to kill or two runs at once)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ifbatch.configs import load_config
from ifbatch.tasks.outputs.credentials import with_key_files
from ifbatch.tasks.run import Run

LOCAL = ["executor=local"]
SMALL_BATCHES = [f"{s}.batch_size=2" for s in ("text_encoder", "stage_1", "stage_2", "stage_3")]


def run_local(prompts: str, output: str, overrides: list[str], **params):
    """One run in this process: its RunRecord."""
    cfg = with_key_files(load_config("tiny", [*overrides, *LOCAL]))  # (a signer, as GenerateParams.config reads it)
    return Run({"prompts": prompts, "output": output, "overrides": overrides, **params}, cfg)()


def local_args(prompts: str, output: str, overrides: list[str]) -> list[str]:
    """`ifbatch run` arguments for a run without Prefect or Ray."""
    sets = [a for o in [*overrides, *LOCAL] for a in ("--set", o)]
    return ["run", prompts, output, *sets, "--no-prefect", "--no-progress"]


def start(args: list[str], env: dict | None = None, **popen) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("ifbatch")
    return subprocess.Popen([str(exe), *args], env={**os.environ, **(env or {})}, **popen)
