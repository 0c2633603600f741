"""Operating ifbatch from Prefect: a real `prefect server`, deployments served by `ifbatch serve`, runs started
through the API exactly as the dashboard's Run button starts them, schedules, artifacts, failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from ifbatch.tasks.outputs.manifest import read_manifest
from ifbatch.tasks.storage import locate

from .helpers import SMALL, write_table
from .services import PrefectServer, stop_group

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ.setdefault("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS", "5")
    srv = PrefectServer(home).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def nightly(tmp_path_factory):
    d = tmp_path_factory.mktemp("nightly")
    return write_table(d / "prompts.parquet", {"prompt": SMALL[:2]}), str(d / "out")


@pytest.fixture(scope="module")
def served(server, nightly, ray_cluster, tiny_dir, tmp_path_factory):
    """`ifbatch serve` in the background, as an operator runs it."""
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "wb")
    env = {**os.environ, **server.env(), "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("ifbatch")),
            "serve",
            "--every",
            "30",
            "--nightly-prompts",
            nightly[0],
            "--nightly-output",
            nightly[1],
            "--ray-address",
            ray_cluster,
            "--set",
            f"tiny.dir={tiny_dir}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    with api(server):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"ifbatch serve exited; see {log.name}"
            with client() as c:
                names = {d.name for d in c.read_deployments()}
            if {"generate", "nightly-dataset"} <= names:
                break
            time.sleep(1)
        else:
            raise TimeoutError("deployments did not appear")
    yield proc
    stop_group(proc)
    log.close()


def api(server):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: server.api})


def client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def start(params: dict, timeout: float = 600):
    """What the Run button does: create a flow run of the deployment with these parameters, then wait for it."""
    from prefect.deployments import run_deployment

    return run_deployment("ifbatch-generate/generate", parameters={"params": params}, timeout=timeout)


def artifacts_of(run_id):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with client() as c:
        return c.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))


def test_dashboard_run_completes_with_artifacts(server, served, tmp_path, tiny_dir, ray_cluster):
    prompts = write_table(tmp_path / "p.parquet", {"prompt": ["a cat *wearing* a [hat](http://x)", *SMALL[:3]]})
    out = str(tmp_path / "out")
    with api(server):
        run = start(
            {
                "prompts": prompts,
                "output": out,
                "preset": "tiny",
                "overrides": [f"tiny.dir={tiny_dir}"],
                "ray_address": ray_cluster,
            }
        )
        assert run.state.is_completed(), run.state.message
        assert run.name.startswith("generate[tiny] ")
        arts = {a.type: a for a in artifacts_of(run.id)}
    assert read_manifest(locate(out)).num_rows == 4
    assert {"progress", "table", "markdown"} <= set(arts)
    assert float(arts["progress"].data) == 100.0
    data = arts["table"].data
    table = {r["what"]: r["value"] for r in (json.loads(data) if isinstance(data, str) else data)}
    assert (table["done"], table["failed"], table["rejected"], table["skipped by resume"]) == (4, 0, 0, 0)
    assert any(k.startswith("stage_3 s/image") for k in table)
    md = arts["markdown"].data
    assert "contact sheet" in md and "manifest" in md and "tiny" in md
    assert r"a cat \*wearing\* a \[hat\]\(http://x\)" in md  # prompt text is escaped, not rendered
    sheet = next(Path(out, "runs").glob("*-contact-sheet.png"))
    assert str(sheet) in md
    with Image.open(sheet) as im:
        assert im.size == (4 * 128, 128 + 14)


def test_bad_parameters_are_refused_before_a_run_starts(server, served):
    with api(server), pytest.raises(Exception) as e:
        start({"prompts": "x.parquet", "output": "out", "preset": "if-xxl"}, timeout=30)
    assert "if-xxl" in str(e.value) or "preset" in str(e.value)


def test_failed_run_says_why_first(server, served, tmp_path):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    prompts = write_table(tmp_path / "p.parquet", {"caption": ["a cat"]})
    with api(server):
        run = start({"prompts": prompts, "output": str(tmp_path / "out"), "preset": "tiny"})
        assert run.state.is_failed()
        assert "no column 'prompt'" in run.state.message
        deadline = time.monotonic() + 60  # the run's logs reach the API a little after its final state
        while time.monotonic() < deadline:
            with client() as c:
                logs = c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            errors = [e.message for e in sorted(logs, key=lambda x: x.timestamp) if e.level >= 40]
            if errors:
                break
            time.sleep(1)
    assert errors and "no column 'prompt'" in errors[0] and prompts in errors[0]


def test_scheduled_deployment_runs_by_itself(server, served, nightly):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    deadline = time.monotonic() + 300
    with api(server):
        while time.monotonic() < deadline:
            with client() as c:
                runs = c.read_flow_runs(
                    deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["nightly-dataset"]))
                )
            if any(r.state and r.state.is_completed() for r in runs):
                break
            time.sleep(3)
        else:
            raise AssertionError(f"no scheduled run completed; states: {[r.state_name for r in runs]}")
        with client() as c:  # shown: stop its schedule, whose late runs would keep the server's SQLite busy
            c.pause_deployment(c.read_deployment_by_name("ifbatch-generate/nightly-dataset").id)
    assert read_manifest(locate(nightly[1])).num_rows == 2


def test_ui_is_served(server):
    with urllib.request.urlopen(server.url, timeout=10) as r:
        assert r.status == 200 and b"<html" in r.read().lower()


CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "prefect-run.png"


def test_run_from_the_dashboard_in_a_real_browser(server, served, tmp_path):
    """Debian's chromium, headless, driven by Playwright: Custom run with a changed parameter, then the run page."""
    assert Path(CHROMIUM).exists(), "the UI test needs Debian's chromium: apt-get install -y chromium"
    from playwright.sync_api import sync_playwright

    out = str(tmp_path / "from-the-ui")
    prompts = write_table(tmp_path / "p.parquet", {"prompt": SMALL[:4]})
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(f"{server.url}/deployments")
        page.get_by_text("generate", exact=True).first.click()
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Custom run").click()
        page.get_by_text("Output folder or s3://bucket/prefix").wait_for()  # the form shows field descriptions
        fields = page.locator("textarea")
        assert fields.nth(1).input_value() == "out/dashboard"  # the deployment's default
        fields.nth(0).fill(prompts)
        fields.nth(1).fill(out)
        page.get_by_role("button", name="Submit").click()
        wait_for_run_with_output(server, out, final=False)  # the form's submission reached the API
        page.goto("about:blank")  # a live run page polls the API: leave the 2 cores to the run meanwhile

        run = wait_for_run_with_output(server, out)
        assert run.state.is_completed(), run.state.message
        page.goto(f"{server.url}/runs/flow-run/{run.id}")
        page.get_by_text("Completed").first.wait_for()
        page.get_by_text(f"-> {out}").first.wait_for()  # the run name says what it did
        page.wait_for_timeout(1500)  # let the timeline settle for the picture
        page.screenshot(path=str(tmp_path / "run.png"), full_page=False)
        page.get_by_text("Artifacts", exact=True).click()
        page.get_by_text("ifbatch-summary-").first.wait_for()
        page.get_by_text("ifbatch-counts-").first.wait_for()
        browser.close()
    assert read_manifest(locate(out)).num_rows == 4
    if os.environ.get("IFBATCH_UPDATE_SCREENSHOT"):
        SCREENSHOT.write_bytes((tmp_path / "run.png").read_bytes())


def wait_for_run_with_output(server, out: str, timeout: float = 400, final: bool = True):
    """The flow run that writes to `out`, once it exists (final=False) or once it has ended."""
    deadline = time.monotonic() + timeout
    with api(server):
        while time.monotonic() < deadline:
            with client() as c:
                runs = [r for r in c.read_flow_runs() if (r.parameters.get("params") or {}).get("output") == out]
            if runs and (not final or (runs[0].state and runs[0].state.is_final())):
                return runs[0]
            time.sleep(2)
    raise TimeoutError(f"no {'finished ' if final else ''}run wrote to {out}")
