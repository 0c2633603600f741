"""Deployments of the generate flow: `generate` on demand (the dashboard's Run button) and a scheduled
dataset-synthesis job that reruns over a prompts prefix into one output (each run resumes: only new rows)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from prefect import serve

from .generate import generate

EXAMPLES = str(Path(__file__).resolve().parents[1] / "examples" / "prompts.parquet")


def deployments(
    nightly_prompts: str = EXAMPLES,
    nightly_output: str = "out/nightly",
    nightly_preset: str = "tiny",
    nightly_cron: str = "0 2 * * *",
    every_seconds: float | None = None,
    ray_address: str | None = None,
    overrides: list[str] | None = None,
) -> list:
    """The on-demand `generate` deployment and the scheduled `nightly-dataset` one."""
    common = {"ray_address": ray_address, "overrides": list(overrides or [])}
    on_demand = generate.to_deployment(
        name="generate",
        tags=["ifbatch"],
        description="Generate images for every prompt row (data.images_per_prompt, or the row's n column). Edit "
        "the parameters in the Run form; rerunning into the "
        "same output resumes.",
        parameters={"params": {"prompts": EXAMPLES, "output": "out/dashboard", "preset": "tiny", **common}},
    )
    schedule = {"interval": dt.timedelta(seconds=every_seconds)} if every_seconds else {"cron": nightly_cron}
    nightly = generate.to_deployment(
        name="nightly-dataset",
        tags=["ifbatch", "scheduled"],
        description=f"Dataset synthesis over {nightly_prompts} into {nightly_output}; each run resumes, so only "
        f"prompts added since the last run are generated.",
        parameters={
            "params": {"prompts": nightly_prompts, "output": nightly_output, "preset": nightly_preset, **common}
        },
        **schedule,
    )
    return [on_demand, nightly]


def serve_deployments(limit: int = 1, **kwargs) -> None:
    """Serve both deployments from this process (no work pool needed); `limit` runs at a time."""
    serve(*deployments(**kwargs), limit=limit)
