"""Driving a real Prefect API as the dashboard does: Run, Cancel, Retry; waiting for runs; reading run records."""

from __future__ import annotations

import datetime as dt
import json
import time

from ifbatch.tasks.outputs.manifest import part_paths, read_manifest
from ifbatch.tasks.storage import locate


def api(server):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: server.api})


def client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def start(params: dict, timeout: float = 600, deployment: str = "ifbatch-generate/generate"):
    """What the Run button does: create a flow run of the deployment with these parameters; wait for it to end
    (timeout=0: return at once)."""
    from prefect.deployments import run_deployment

    return run_deployment(deployment, parameters={"params": params}, timeout=timeout)


def wait_final(run_id, timeout: float = 600, runs: int = 1):
    """The flow run once it is in a final state (after its `runs`-th attempt, for a retried run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with client() as c:
            run = c.read_flow_run(run_id)
        if run.state and run.state.is_final() and run.run_count >= runs:
            return run
        time.sleep(1)
    raise TimeoutError(f"flow run {run_id} not final after {timeout}s: {run.state_name} (attempt {run.run_count})")


def cancel(run_id) -> None:
    """What the dashboard's Cancel does: ask for Cancelling; the process that runs it then stops it."""
    from prefect.states import Cancelling

    with client() as c:
        c.set_flow_run_state(run_id, Cancelling(message="cancelled from the dashboard"))


def retry(run_id) -> None:
    """What the dashboard's Retry does to a failed run: schedule it again, now, as AwaitingRetry (forced)."""
    from prefect.states import Scheduled

    with client() as c:
        state = Scheduled(scheduled_time=dt.datetime.now(dt.UTC), name="AwaitingRetry", message="Retry from the UI")
        c.set_flow_run_state(run_id, state, force=True)


def run_records(output: str) -> list[dict]:
    """The output's run records, oldest first."""
    loc = locate(output)
    paths = sorted(p for p in loc.fs.glob(loc.path("runs", "*.json")))
    return [json.loads(loc.fs.cat_file(p)) for p in paths]


def ray_actors_alive() -> set[str]:
    """Ids of the jobs' actors alive on the Ray cluster this process is connected to (GCS state: no dashboard
    needed). Detached actors are not a job's: Ray Data's cluster singletons (_StatsActor, ActorLocationTracker,
    _AutoscalingCoordinatorActor) are made by the first dataset a cluster runs and outlive every job by design."""
    import ray._private.state as state

    return {a for a, info in state.actors().items() if info["State"] == "ALIVE" and not info.get("IsDetached")}


def actor_names(ids: set[str]) -> list[str]:
    """The class names of these actors (for an assertion's message)."""
    import ray._private.state as state

    return sorted(
        f"{info.get('ActorClassName') or info.get('Name')} ({a[:8]})" for a, info in state.actors().items() if a in ids
    )


def wait_for_records(out: str, run, timeout: float = 300) -> int:
    """Wait until the run has written a manifest part; the ok images recorded then."""
    deadline = time.monotonic() + timeout
    while not part_paths(locate(out)):
        with client() as c:
            state = c.read_flow_run(run.id).state
        assert not state.is_final(), f"the run ended before the test could act: {state}"
        assert time.monotonic() < deadline, "no manifest part appeared"
        time.sleep(0.5)
    return len(manifest_ids(out))


def manifest_ids(out: str) -> list[str]:
    t = read_manifest(locate(out), ["id", "status"]).to_pylist()
    return [r["id"] for r in t if r["status"] == "ok"]
