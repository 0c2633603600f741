"""`ifbatch`: run the generate flow from a terminal, with a progress bar; exits non-zero when rows failed."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import textwrap
import time

from .check import add_parsers as add_check_parsers
from .check import compact_command, verify_command
from .operate import add_parsers as add_operate_parsers
from .operate import alerts_command, deployments_command, serve_command

EXAMPLES = textwrap.dedent("""
    examples:
      ifbatch run examples/prompts.parquet ./out                       # tiny cascade, local Ray, local files
      ifbatch run s3://bucket/prompts/ s3://bucket/images --preset if-xl --ray-address auto
      ifbatch run captions.parquet ./out --prompt-column caption --set stage_1.steps=50 --set seed=7
      ifbatch plan prompts.parquet --preset if-xl --gpus 8             # the plan, time and GPU-hours first
      ifbatch verify s3://bucket/images                                # is every image there, as recorded?
      ifbatch presets                                                  # list presets and what they set

    exit status: 0 all images done; 1 some images failed or rows were rejected, or the run stopped after
                 generation started (the store stayed down, a node left: what was done is recorded, rerun to
                 resume); 2 the run could not start (bad arguments, config, prompt table, output, model, or
                 another run writing into OUTPUT).
    environment: PREFECT_API_URL (a Prefect server; unset = a temporary local one), AWS_ACCESS_KEY_ID,
                 AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION (S3), HF_TOKEN (gated IF weights),
                 IFBATCH_VERBOSE=1 (as --verbose).
""")


def parser() -> argparse.ArgumentParser:
    from ifbatch.configs import preset_names

    p = argparse.ArgumentParser(
        prog="ifbatch",
        description="Batch text-to-image generation with the DeepFloyd IF "
        "cascade: Prefect flow, Ray stage actors, images + Parquet manifest to a folder "
        "or S3.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="generate images for a prompt table (resumes into an existing output)",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run_arguments(run)
    run.add_argument(
        "--no-prefect",
        action="store_true",
        help="run without Prefect: no temporary API, no flow run on a dashboard (with --set executor=local, no Ray "
        "either: every stage in this process)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    run.add_argument(
        "--verbose",
        action="store_true",
        help="show every library's log lines on the terminal too (by default they stay in the Ray and Prefect logs)",
    )
    sub.add_parser("presets", help="list the presets and their models")
    pl = sub.add_parser(
        "plan",
        help="print the stage plan and the time and GPU-hours a table will take, before anything loads",
        description="Plan a run: per stage replicas, GPU share, batch, seconds per "
        "image and share of the work, from the cost table (configs/costs_data/costs.yaml).",
    )
    pl.add_argument("prompts", help="Parquet file, folder of Parquet parts, or s3://bucket/key")
    pl.add_argument("--preset", default="if-xl", choices=preset_names(), help="model preset (default: if-xl)")
    pl.add_argument("--gpus", type=int, help="GPUs to plan for (default: those of the Ray cluster at --ray-address)")
    pl.add_argument("--ray-address", help="count the GPUs of this Ray cluster ('auto', ray://host:10001)")
    pl.add_argument(
        "--gpu-kind",
        help="GPU kind in the cost table (default: plan.gpu_kind, else as the cluster says, else H200)",
    )
    pl.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config overrides, as for run"
    )
    pl.add_argument("--prompt-column", help="name of the prompt column when it is not 'prompt'")
    add_check_parsers(sub)
    add_operate_parsers(sub)
    return p


def run_arguments(run: argparse.ArgumentParser) -> None:
    """`ifbatch run`'s arguments, one per field of the flow's parameters (GenerateParams): what the dashboard's form
    asks, the terminal asks, with the same help."""
    import typing

    from ifbatch.flows.generate import GenerateParams

    for name, field in GenerateParams.model_fields.items():
        extra = field.json_schema_extra or {}
        flag = extra.get("cli") or f"--{name.replace('_', '-')}"
        help_text = (field.description or "").rstrip(".")
        if field.is_required():
            run.add_argument(name, help=help_text)
        elif field.annotation is bool:
            run.add_argument(flag, dest=name, action="store_true", help=help_text)
        elif typing.get_origin(field.annotation) is list:
            run.add_argument(flag, dest=name, action="append", default=[], metavar=extra.get("metavar"), help=help_text)
        elif typing.get_origin(field.annotation) is typing.Literal:
            choices = typing.get_args(field.annotation)
            help_text += f" (default: {field.default})"
            run.add_argument(flag, dest=name, default=field.default, choices=choices, help=help_text)
        else:
            run.add_argument(flag, dest=name, default=field.default, help=help_text)


def _presets() -> int:
    from ifbatch.configs import load_config, preset_names

    for name in preset_names():
        c = load_config(name)
        print(
            f"{name:8} {c.stage_1.source} + {c.stage_2.source} + {c.stage_3.source} "
            f"({c.stage_1.dtype}, steps {c.stage_1.steps}/{c.stage_2.steps}/{c.stage_3.steps})"
        )
    return 0


def _run(args: argparse.Namespace) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The run starts (or joins) Ray itself (tasks/stream/ray/session.py). Without this, a Ray call that comes after
    # ray.shutdown -- the stream's reader thread, once a Ctrl-C has stopped the run -- starts a new cluster.
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    from ifbatch.models.quiet import VERBOSE_ENV

    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    from prefect.exceptions import TerminationSignal

    from ifbatch.flows.generate import GenerateParams
    from ifbatch.tasks.run import USER_ERRORS
    from ifbatch.tasks.run_record import NOT_STARTED
    from ifbatch.tasks.stream.interrupt import exit_status

    try:
        params = GenerateParams(**{name: getattr(args, name) for name in GenerateParams.model_fields})
        cfg = params.config()  # refuse bad overrides before anything starts
    except (*USER_ERRORS, ValueError) as e:  # ValueError: pydantic's, for a parameter
        print(f"ifbatch: {e}", file=sys.stderr)
        return NOT_STARTED
    from ifbatch.tasks.run import preflight

    from .terminal import filtered_stderr, on_terminal, prefect_api, quiet_prefect_console, without_ray_notices

    if not args.verbose:
        quiet_prefect_console()

    with on_terminal():  # Ctrl-C / SIGTERM stop the run gracefully, a second one at once
        try:
            try:  # the cluster answers, the table's columns, the output writable: before Prefect
                preflight(params.prompts, params.output, cfg)
            except USER_ERRORS as e:
                print(f"ifbatch: {e}", file=sys.stderr)
                return NOT_STARTED
            if not args.no_prefect:
                prefect_api()  # before the filter: the API's process keeps the terminal's own stderr
            with (
                contextlib.nullcontext() if args.verbose else filtered_stderr(),
                contextlib.nullcontext() if args.verbose else without_ray_notices(),
            ):
                return _generate(params, cfg, progress_bar=not args.no_progress, prefect=not args.no_prefect)
        except (KeyboardInterrupt, TerminationSignal) as e:  # before any image was made: nothing to keep
            signum = getattr(e, "signal", signal.SIGINT)
            print(
                f"ifbatch: interrupted ({signal.Signals(signum).name}) before any image was made; nothing to keep. "
                f"Rerun the same command to run it",
                file=sys.stderr,
            )
            return exit_status(signum)


def _flow_run(params) -> tuple[object, str]:
    """The run as a Prefect flow run: (its run record, or what stopped it before it had one; the state's message)."""
    from ifbatch.flows.generate import generate

    state = generate(params, return_state=True)
    return state.result(raise_on_failure=False), state.message


def _plain_run(params, cfg) -> tuple[object, str]:
    """The run without Prefect (tasks/run.py), its log lines on the terminal."""
    import logging

    from ifbatch.tasks.run import Run, operator_errors
    from ifbatch.tasks.run_record import RunParams

    log = logging.getLogger("ifbatch.run")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d | %(levelname)-7s | %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False  # the root logger's handlers (a library's) would print each line again
    try:
        record = Run(RunParams.of(params), cfg, log=log)()
    except operator_errors() as e:
        reason = f"{type(e).__name__}: {e}"
        log.error("run failed: %s", reason)
        return None, reason
    return record, record.line


def _generate(params, cfg, progress_bar: bool, prefect: bool = True) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ifbatch.tasks.run_record import RunRecord, exit_code
    from ifbatch.tasks.stream import progress

    bar = None
    if progress_bar:
        bar = Progress(
            TextColumn("generating"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:.2f} images/s"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            transient=False,
        )
        job = bar.add_task("images", total=None, rate=0.0)
        stop = progress.listen(lambda p: bar.update(job, completed=p.done + p.failed, total=p.total, rate=p.rate))
        bar.start()
    t0 = time.monotonic()
    try:
        record, message = _flow_run(params) if prefect else _plain_run(params, cfg)
    finally:
        if bar is not None:
            bar.stop()
            stop()
    if not isinstance(record, RunRecord):  # the run could not start: bad table, config, model or storage
        print(f"ifbatch: run failed: {message or record}", file=sys.stderr)
    elif record.status not in ("done", "failed"):  # it stopped or was interrupted: what was done is recorded
        print(f"ifbatch: {record.line}", file=sys.stderr)
    else:
        print(record.line)
        wall = time.monotonic() - t0
        first, startup = record.first_image_seconds, record.startup_seconds
        print(
            f"wall {wall:.1f} s: run {record.seconds:.1f} s; "
            f"start-up (models checked, cluster, placement) {startup:.1f} s"
            + (f", first image after {first:.1f} s (models loaded)" if first is not None else "")
            + f"; {record.rows_per_second:.2f} images/s while generating"
        )
        for err in record.errors[:5]:
            print(f"  failed {err['id']}: {err['error']}", file=sys.stderr)
    return exit_code(record)


def _plan(args: argparse.Namespace) -> int:
    from ifbatch.configs import load_config
    from ifbatch.configs.costs import load_costs
    from ifbatch.configs.loader import override_keys
    from ifbatch.tasks.inputs.expand import image_count
    from ifbatch.tasks.inputs.prompts import read_prompts
    from ifbatch.tasks.run import USER_ERRORS
    from ifbatch.tasks.stream.planner import plan
    from ifbatch.tasks.stream.ray.cluster import DEFAULT_KIND

    extra = [f"data.prompt_column={args.prompt_column}"] if args.prompt_column else []
    try:
        cfg = load_config(args.preset, [*args.overrides, *extra])
        cluster = None if args.gpus is not None else _cluster_gpus(args.ray_address)
        gpus = args.gpus if cluster is None else cluster.gpus
        costs = load_costs(cfg.plan.costs, cfg.plan.gpu_tflops)
        found_kind = cluster.kind if cluster else None
        kind = args.gpu_kind or cfg.plan.gpu_kind or found_kind or DEFAULT_KIND  # as a run picks it (ray/placing.py)
        p = plan(
            cfg,
            costs,
            gpus,
            kind,
            explicit=override_keys(args.overrides),
            cpus_per_gpu=cluster.cpus_per_gpu if cluster else None,
            memory_gb=cfg.plan.gpu_memory_gb or (cluster.memory_gb if cluster else None),
        )
        table = read_prompts(args.prompts, cfg)
    except (*USER_ERRORS, ValueError) as e:
        print(f"ifbatch: {e}", file=sys.stderr)
        return 2
    images = image_count(table.rows)
    print(
        f"{args.prompts}: {table.rows.num_rows} rows to generate, {images} images ({len(table.rejected)} rows "
        f"rejected), preset {args.preset}"
    )
    print("\n".join(p.lines(images)))
    return 0


def _cluster_gpus(address: str | None):
    if not address:
        raise ValueError("give --gpus N, or --ray-address of a cluster whose GPUs to count")
    import ray

    from ifbatch.tasks.stream.ray.cluster import cluster_gpus
    from ifbatch.tasks.stream.ray.session import reach

    reach(address, "--ray-address")
    ray.init(address=address, include_dashboard=False, logging_level="ERROR")
    try:
        c = cluster_gpus()
    finally:
        ray.shutdown()
    if c.total == 0:
        raise ValueError(f"the Ray cluster at {address} has no GPUs; give --gpus N to plan for GPUs it does not have")
    print(f"cluster: {c.shape()}")
    return c


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "presets":
        return _presets()
    commands = {
        "serve": serve_command,
        "deployments": deployments_command,
        "alerts": alerts_command,
        "run": _run,
        "plan": _plan,
        "verify": verify_command,
        "compact": compact_command,
    }
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
