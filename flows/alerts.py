"""Alerts: a Prefect automation that sends a notification through one of the operator's notification blocks
(Slack, Teams, e-mail, PagerDuty, a custom webhook ...) whenever a generate run fails or crashes, with the run's
name, final state, the reason (the state's message) and a link to it. The Prefect server evaluates it, so it fires
for a run whose process died too (Crashed), which no hook inside that process could report."""

from __future__ import annotations

from ifbatch.configs import ConfigError

from .generate import generate

AUTOMATION = "ifbatch: a generate run failed or crashed"
SUBJECT = "ifbatch run {{ flow_run.name }} {{ flow_run.state.name }}"
BODY = (
    "ifbatch run {{ flow_run.name }} ended {{ flow_run.state.name }}: {{ flow_run.state.message }}\n"
    "{{ flow_run|ui_url }}"
)


def notification_block_id(spec: str):
    """The id of the notification block 'type-slug/name' (e.g. slack-webhook/ops, custom-webhook/oncall)."""
    from prefect.blocks.core import Block

    if "/" not in spec:
        raise ConfigError(
            f"--notify {spec!r}: expected a notification block as <block type>/<name>, e.g. slack-webhook/ops "
            f"or custom-webhook/oncall (see the dashboard's Blocks page)"
        )
    try:
        block = Block.load(spec)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"--notify {spec!r}: no such block at this Prefect API ({e})") from e
    if not hasattr(block, "notify"):
        raise ConfigError(f"--notify {spec!r}: a {type(block).__name__} block cannot send notifications")
    return block._block_document_id


def install_alerts(spec: str) -> str:
    """Create the automation, or point the existing one at this block; returns its id."""
    from prefect.automations import Automation
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    action = SendNotification(block_document_id=notification_block_id(spec), subject=SUBJECT, body=BODY)
    trigger = EventTrigger(
        match={"prefect.resource.id": "prefect.flow-run.*"},
        match_related={"prefect.resource.role": "flow", "prefect.resource.name": generate.name},
        expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
        posture=Posture.Reactive,
        threshold=1,
    )
    try:
        existing = Automation.read(name=AUTOMATION)
    except ValueError:
        existing = None
    if existing is not None:
        existing.trigger, existing.actions, existing.enabled = trigger, [action], True
        existing.update()
        return str(existing.id)
    made = Automation(
        name=AUTOMATION,
        description="Sends the reason a generate run failed or crashed (ifbatch alerts).",
        trigger=trigger,
        actions=[action],
    ).create()
    return str(made.id)
