"""`ifbatch serve`, `ifbatch deployments` and `ifbatch alerts`: running ifbatch from Prefect."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_parsers(sub) -> None:
    from ifbatch.configs import preset_names

    srv = sub.add_parser(
        "serve",
        help="serve the Prefect deployments (generate, nightly-dataset) from this process",
        description="Serve the `generate` (on demand) and `nightly-dataset` (scheduled) deployments "
        "to the Prefect API in PREFECT_API_URL; runs start from the dashboard or the "
        "schedule and execute in subprocesses of this one. Runs on the same GPUs take turns: each holds a slot "
        "of the Prefect global concurrency limit ifbatch-gpus-<host> (created at 1 slot if missing).",
    )
    srv.add_argument(
        "--nightly-prompts",
        default=None,
        help="prompts table or prefix of the scheduled job (default: the example table)",
    )
    srv.add_argument("--nightly-output", default="out/nightly", help="output of the scheduled job")
    srv.add_argument("--nightly-preset", default="tiny", choices=preset_names())
    srv.add_argument("--nightly-cron", default="0 2 * * *", help="cron schedule (default: 02:00 UTC daily)")
    srv.add_argument(
        "--every",
        type=float,
        default=None,
        metavar="SECONDS",
        help="run the scheduled job every SECONDS instead of the cron schedule",
    )
    srv.add_argument("--ray-address", default=None, help="Ray cluster the runs join (default: a local one each)")
    srv.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for both deployments' default parameters",
    )
    srv.add_argument(
        "--limit",
        type=int,
        default=4,
        help="flow runs this process starts at a time (default 4); runs on the same GPUs still take turns",
    )
    srv.add_argument(
        "--notify",
        metavar="BLOCK",
        help="also install the failure alert (as `ifbatch alerts --notify BLOCK`)",
    )
    dep = sub.add_parser(
        "deployments",
        help="print prefect.yaml (the deployments for a work pool), from the definitions `serve` uses",
    )
    dep.add_argument("--write", metavar="FILE", help="write it to FILE instead (e.g. prefect.yaml)")
    dep.add_argument("--pool", default="ifbatch", help="work pool name (default: ifbatch)")
    al = sub.add_parser(
        "alerts",
        help="send a notification when a generate run fails or crashes (a Prefect automation)",
        description="Create (or update) the Prefect automation that sends a failed or crashed generate run's "
        "name, state, reason and link through a notification block, e.g. slack-webhook/ops or "
        "custom-webhook/oncall (create the block on the dashboard's Blocks page first).",
    )
    al.add_argument("--notify", required=True, metavar="BLOCK", help="notification block, <block type>/<name>")


def serve_command(args: argparse.Namespace) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from ifbatch.configs import ConfigError, load_config
    from ifbatch.flows.deploy import EXAMPLES, serve_deployments
    from ifbatch.flows.gpu_slot import ensure_limit, slot_name

    try:
        extra = [f"ray.address={args.ray_address}"] if args.ray_address else []
        rc = load_config(args.nightly_preset, [*args.overrides, *extra]).ray
        if args.notify:
            alerts_command(args)
    except ConfigError as e:
        print(f"ifbatch serve: {e}", file=sys.stderr)
        return 2
    if ensure_limit(slot_name(rc), rc.runs_at_once):
        print(f"created the Prefect global concurrency limit {slot_name(rc)} ({rc.runs_at_once} run at a time)")
    serve_deployments(
        limit=args.limit,
        nightly_prompts=args.nightly_prompts or EXAMPLES,
        nightly_output=args.nightly_output,
        nightly_preset=args.nightly_preset,
        nightly_cron=args.nightly_cron,
        every_seconds=args.every,
        ray_address=args.ray_address,
        overrides=args.overrides,
    )
    return 0


def deployments_command(args: argparse.Namespace) -> int:
    from ifbatch.flows.deploy import prefect_yaml

    text = prefect_yaml(args.pool)
    if args.write:
        Path(args.write).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def alerts_command(args: argparse.Namespace) -> int:
    from ifbatch.flows.alerts import AUTOMATION, install_alerts

    automation = install_alerts(args.notify)
    print(f"automation {AUTOMATION!r} ({automation}): failed or crashed generate runs notify {args.notify}")
    return 0
