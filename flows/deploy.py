"""The deployments of the generate flow, defined once: `generate` on demand (the dashboard's Run button) and a
scheduled dataset-synthesis job that reruns over a prompts prefix into one output (each run resumes: only new rows).
`ifbatch serve` serves them from one process; `prefect.yaml` (written by `ifbatch deployments`, from the same
definitions) deploys them to a work pool."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import yaml

from .generate import generate

CHECKOUT = Path(__file__).resolve().parents[1]
EXAMPLES = str(CHECKOUT / "examples" / "prompts.parquet")
ENTRYPOINT = "flows/generate.py:generate"  # relative to the checkout a worker runs from
POOL = "ifbatch"

YAML_HEADER = """\
# Deployments for a Prefect work pool (the other way is `ifbatch serve`, which needs no pool).
# Written by `ifbatch deployments --write prefect.yaml` from flows/deploy.py, which `ifbatch serve` serves too:
# edit that, not this (a test checks they agree).
#   prefect work-pool create ifbatch --type process
#   prefect deploy --all --no-prompt          # from this directory, with PREFECT_API_URL set
#   IFBATCH_CHECKOUT=$PWD prefect worker start --pool ifbatch   # on each machine that runs flows
"""


def deployments(
    nightly_prompts: str = EXAMPLES,
    nightly_output: str = "out/nightly",
    nightly_preset: str = "tiny",
    nightly_cron: str = "0 2 * * *",
    every_seconds: float | None = None,
    ray_address: str | None = None,
    overrides: list[str] | None = None,
    examples: str = EXAMPLES,
) -> list:
    """The on-demand `generate` deployment and the scheduled `nightly-dataset` one."""
    common = {"ray_address": ray_address, "overrides": list(overrides or [])}
    on_demand = generate.to_deployment(
        name="generate",
        tags=["ifbatch"],
        description="Generate images for every prompt row (data.images_per_prompt, or the row's n column). Edit "
        "the parameters in the Run form; rerunning into the same output resumes. Runs on the same GPUs take "
        "turns (the ifbatch-gpus-<host> concurrency limit).",
        parameters={"params": {"prompts": examples, "output": "out/dashboard", "preset": "tiny", **common}},
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


def serve_deployments(limit: int = 4, **kwargs) -> None:
    """Serve both deployments from this process (no work pool needed); at most `limit` runs at a time."""
    from prefect import serve

    serve(*deployments(**kwargs), limit=limit)


def _schedule(s) -> dict:
    if getattr(s, "cron", None):
        return {"cron": s.cron, "timezone": s.timezone or "UTC"}
    return {"interval": s.interval.total_seconds()}


def prefect_yaml(pool: str = POOL) -> str:
    """prefect.yaml for a work pool, from the same definitions as `ifbatch serve`, with a production-shaped
    nightly job (S3 in and out, the if-xl preset); paths relative to the checkout the worker runs in."""
    import prefect

    deps = deployments(
        nightly_prompts="s3://my-bucket/prompts/",
        nightly_output="s3://my-bucket/datasets/nightly",
        nightly_preset="if-xl",
        examples="examples/prompts.parquet",
    )
    doc = {
        "name": "ifbatch",
        "prefect-version": prefect.__version__,
        # the worker runs flows from a checkout with ifbatch installed (pip install -e .)
        "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $IFBATCH_CHECKOUT }}"}}],
        "deployments": [
            {
                "name": d.name,
                "description": d.description,
                "entrypoint": ENTRYPOINT,
                "tags": list(d.tags),
                "work_pool": {"name": pool},
                "parameters": json.loads(json.dumps(d.parameters)),  # own copies: no YAML anchors
                **({"schedules": [_schedule(s.schedule) for s in d.schedules]} if d.schedules else {}),
            }
            for d in deps
        ],
    }
    return YAML_HEADER + yaml.safe_dump(doc, sort_keys=False, width=110)
