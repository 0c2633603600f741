"""The run's steps as Prefect tasks (tasks/run.py is the run): the I/O steps retry (they are idempotent),
generation resumes instead of retrying blindly; and the run's artifacts on the dashboard."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed

from ifbatch.configs.schema import CascadeConfig

from .artifacts import artifact_key, contact_sheet, counts_table, run_records, summary_markdown
from .outputs.manifest import MANIFEST_DIR
from .run import USER_ERRORS
from .run_record import RunRecord, RunStopped
from .storage import locate

HANDLED = (*USER_ERRORS, RunStopped)  # the run says what happened on one line: no task traceback on the terminal


def _transient(task, task_run, state) -> bool:
    """Retry a step only for what may pass (a store that hiccuped), not for what only the user can fix or what
    the run handles (a stop after generation started): a retry would fail the same way, and Prefect logs a
    traceback before each."""
    return not isinstance(state.data, HANDLED)


def prefect_step(name: str, fn: Callable[[], Any], retries: int) -> Any:
    """Run one step of a Run as a Prefect task of that name (what the dashboard shows), retried `retries` times.
    An error the run handles (HANDLED) ends the task Failed with its one-line reason, not with Prefect's traceback
    of it, and is raised again here for the run to handle; what stopped a run is in its run record whole."""
    kw: dict = dict(name=name, cache_policy=NO_CACHE)
    if retries:
        kw.update(retries=retries, retry_delay_seconds=2, retry_condition_fn=_transient)
    handled: list[BaseException] = []

    def step() -> Any:
        try:
            return fn()
        except HANDLED as e:
            handled.append(e)
            return Failed(message=f"{type(e).__name__}: {e}", data=e)

    state = task(**kw)(step)(return_state=True)
    if handled:
        raise handled[-1]
    return state.result()


@task(name="publish-artifacts", retries=2, retry_delay_seconds=2, retry_condition_fn=_transient, cache_policy=NO_CACHE)
def publish_artifacts(record: RunRecord, cfg: CascadeConfig) -> str | None:
    """The counts table, the markdown summary, and the contact sheet it links to: from the run's record and its
    own manifest parts (what the run made, not the whole output)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    loc = locate(record.output, cfg.s3)
    records = run_records(loc, record.manifest_parts)  # read once, for the sheet and the first rows
    sheet = contact_sheet(loc, record.run_id, records)
    create_table_artifact(
        key=artifact_key(record.run_id, "counts"),
        table=counts_table(record),
        description=f"ifbatch run {record.run_id}: counts and per-stage time",
    )
    sample = records.slice(0, 5).select(["id", "prompt"]).to_pylist()
    md = summary_markdown(record, loc.uri(loc.path(MANIFEST_DIR)), sheet, sample)
    create_markdown_artifact(
        key=artifact_key(record.run_id, "summary"), markdown=md, description=f"ifbatch run {record.run_id}: summary"
    )
    return sheet
