"""The `generate` flow: a prompt table in, images plus a manifest out, resumable, Failed when rows failed."""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger
from prefect.exceptions import TerminationSignal
from prefect.runtime import deployment, flow_run
from prefect.states import Cancelled as PrefectCancelled
from prefect.states import Completed, Failed
from pydantic import BaseModel, ConfigDict, Field

from ifbatch.configs import load_config, preset_names
from ifbatch.configs.schema import CascadeConfig
from ifbatch.tasks.artifacts import LiveProgress
from ifbatch.tasks.run import Run, operator_errors
from ifbatch.tasks.run_record import RunParams, RunRecord
from ifbatch.tasks.steps import prefect_step, publish_artifacts

from .blocks import with_block_credentials, with_signer
from .gpu_slot import gpu_slot
from .terminal import DETAIL

Preset = Literal[tuple(preset_names())]  # type: ignore[valid-type]  # the dashboard renders a dropdown


class GenerateParams(BaseModel):
    """What to generate, from where, to where. Every field shows in the Prefect dashboard's run form, and is an
    argument of `ifbatch run` (flows/cli.py makes them from these fields: required ones positional, `cli` the
    flag's spelling where it is not the field's name)."""

    model_config = ConfigDict(extra="forbid")

    prompts: str = Field(description="Prompt table: a Parquet file, a folder of parts, or s3://bucket/key.")
    output: str = Field(description="Output folder or s3://bucket/prefix. Rerunning into it resumes.")
    preset: Preset = Field("tiny", description="Model preset: tiny (random weights, CPU), if-xl, if-l, if-m.")
    overrides: list[str] = Field(
        default_factory=list,
        description="Config overrides as key=value, e.g. stage_1.steps=50 (see configs/schema.py).",
        json_schema_extra={"cli": "--set", "metavar": "KEY=VALUE"},
    )
    prompt_column: str | None = Field(None, description="Name of the prompt column when it is not 'prompt'.")
    ray_address: str | None = Field(
        None, description="Ray cluster to join ('auto', 'ray://host:10001'); empty = a local cluster."
    )
    overwrite: bool = Field(False, description="Delete earlier images and manifest in the output and start over.")
    wait: bool = Field(False, description="When another run is writing into the output, wait for it to end.")
    aws_credentials: str | None = Field(
        None,
        description="S3 keys and endpoint from a Prefect block: the name of a prefect-aws AwsCredentials block, or "
        "s3-bucket/<name>; empty = the environment's.",
    )

    def config(self) -> CascadeConfig:
        extra = []
        if self.prompt_column:
            extra.append(f"data.prompt_column={self.prompt_column}")
        if self.ray_address:
            extra.append(f"ray.address={self.ray_address}")
        cfg = load_config(self.preset, [*self.overrides, *extra])
        cfg = with_block_credentials(cfg, self.aws_credentials) if self.aws_credentials else cfg
        return with_signer(cfg)  # output.c2pa's signer, read and proven before anything starts


def _run_name() -> str:
    p = flow_run.parameters.get("params") or {}
    if isinstance(p, BaseModel):
        p = p.model_dump()
    return f"generate[{p.get('preset', '?')}] {p.get('prompts', '?')} -> {p.get('output', '?')}"


@flow(name="ifbatch-generate", flow_run_name=_run_name, validate_parameters=True)
def generate(params: GenerateParams):
    """Generate data.images_per_prompt images (or a row's n) per prompt row through the IF cascade on Ray; write
    images and a Parquet manifest. The flow run's state is the run record's status (its data the record):
    Completed when every image is done, Cancelled when interrupted, else Failed."""
    log = get_run_logger()
    try:
        record = _generate(params, log)
    except operator_errors() as e:  # the run could not start: no record
        reason = f"{type(e).__name__}: {e}"
        log.error("run failed: %s", reason)
        return Failed(message=reason)
    if record.status == "interrupted":  # the user stopped it (Ctrl-C on a terminal)
        log.warning("run %s", record.line)
        return PrefectCancelled(message=record.line, data=record)
    if record.status == "stopped":  # generation had started: what was done is recorded, a rerun resumes
        log.error("run stopped: %s", record.line, extra=DETAIL)  # (on a terminal, ifbatch's last line says it)
        if record.traceback:  # the whole cause, for the dashboard (the terminal shows the line)
            log.error("what stopped it:\n%s", record.traceback, extra=DETAIL)
        return Failed(message=record.line, data=record)
    if record.status == "failed":
        log.error("rows did not complete: %s", record.line)
        return Failed(message=record.line, data=record)
    log.info(record.line)
    return Completed(message=record.line, data=record)


def _generate(params: GenerateParams, log) -> RunRecord:
    """The run (tasks/run.py), its steps as Prefect tasks, holding the GPU slot of its cluster (deployment runs),
    ended Cancelled by Prefect's Cancel; then, for a run that finished, its artifacts."""
    cfg = params.config()
    run = Run(
        RunParams.of(params),
        cfg,
        log=log,
        step=prefect_step,
        slot=lambda cfg: gpu_slot(cfg.ray, log, flow_run.id, deployment.id),
        cancels=(TerminationSignal,),
        listeners=[LiveProgress],
    )
    record = run()
    if record.status in ("done", "failed"):
        publish_artifacts(record, cfg)
    return record
