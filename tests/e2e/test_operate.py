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
from urllib.parse import quote

import pytest
from PIL import Image

from ifbatch.configs import load_config
from ifbatch.tasks.outputs.manifest import read_manifest
from ifbatch.tasks.storage import locate

from ..certs import make_chain
from ..helpers import SMALL, write_table
from ..prefect_helpers import (
    actor_names,
    api,
    cancel,
    client,
    manifest_ids,
    ray_actors_alive,
    retry,
    run_records,
    start,
    wait_final,
    wait_for_records,
)
from ..services import FaultyS3Proxy, PrefectServer, SeaweedS3, stop_group

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
    """`ifbatch serve` in the background, as an operator runs it. Its deployments' default runs (the schedule's, the
    browser's) use the local executor, in the run's own process; the tests that need Ray (Cancel, the dashboard run,
    S3 keys) pass their own overrides and the tests' cluster."""
    folder = tmp_path_factory.mktemp("serve")
    log = open(folder / "serve.log", "wb")
    env = {
        **os.environ,
        **server.env(),
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "IFBATCH_SPILL_DIR": str(folder / "spill"),
        "AWS_MAX_ATTEMPTS": "1",  # botocore's own retries off: the Retry test's failing store fails within seconds
    }
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
            "--set",
            "executor=local",
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
    proc.log_path = Path(log.name)
    yield proc
    stop_group(proc)
    log.close()


def artifacts_of(run_id):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with client() as c:
        return c.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))


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


def test_bad_parameters_are_refused_before_a_run_starts(server, served):
    with api(server), pytest.raises(Exception) as e:
        start({"prompts": "x.parquet", "output": "out", "preset": "if-xxl"}, timeout=30)
    assert "if-xxl" in str(e.value) or "preset" in str(e.value)


class Webhook:
    """A small HTTP server standing in for a chat or paging webhook: keeps every body POSTed to it."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        hook = self
        self.bodies: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                hook.bodies.append(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode())
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_port}/hook"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def wait_for(self, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for body in self.bodies:
                if text in body:
                    return body
            time.sleep(1)
        raise TimeoutError(f"no notification with {text!r} in {timeout}s; got {self.bodies}")


@pytest.fixture(scope="module")
def alerts(server, served):
    """A notification block pointed at the test's webhook, and `ifbatch alerts --notify` as an operator runs it."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    hook = Webhook()
    with api(server):
        CustomWebhookNotificationBlock(name="oncall", url=hook.url, json_data={"text": "{{subject}}\n{{body}}"}).save(
            "oncall", overwrite=True
        )
    env = {**os.environ, **server.env()}
    done = subprocess.run(
        [str(Path(sys.executable).with_name("ifbatch")), "alerts", "--notify", "custom-webhook/oncall"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    yield hook
    hook.http.shutdown()


def test_failed_run_says_why_first_and_alerts(server, served, alerts, tmp_path):
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
    # the automation `ifbatch alerts` installed sends the run's name, state and reason to the webhook
    body = json.loads(alerts.wait_for(run.name))["text"]
    assert run.name in body and "Failed" in body and "no column 'prompt'" in body


def test_ui_is_served(server):
    with urllib.request.urlopen(server.url, timeout=10) as r:
        assert r.status == 200 and b"<html" in r.read().lower()


CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "prefect-run.png"


def test_run_from_the_dashboard_in_a_real_browser_completes_with_artifacts(server, served, tmp_path):
    """Debian's chromium, headless, driven by Playwright: Custom run with a changed parameter, then the run page and
    its artifacts. (The run is the deployment's default: the local executor. The artifacts are Prefect's, whatever
    runs the stream.) The output path typed in the form is hostile, as anyone who may start a run can type it: the
    summary's links are links to that folder, and nothing in it becomes a javascript: link or an element."""
    assert Path(CHROMIUM).exists(), "the UI test needs Debian's chromium: apt-get install -y chromium"
    from playwright.sync_api import sync_playwright

    out = str(tmp_path / "from the ui (v2) <img src=x> [a](javascript:alert(1))")
    prompts = write_table(tmp_path / "p.parquet", {"prompt": ["a cat *wearing* a [hat](http://x)", *SMALL[:3]]})
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
        page.get_by_text("ifbatch-counts-").first.wait_for()
        page.get_by_text("ifbatch-summary-").first.click()  # the summary, rendered by Prefect's UI
        page.get_by_text("contact sheet").first.wait_for()
        hrefs = page.locator("a").evaluate_all("els => els.map(e => e.getAttribute('href') || '')")
        injected = page.locator("img[src='x']").count()
        browser.close()
    assert not [h for h in hrefs if h.strip().lower().startswith(("javascript:", "data:", "vbscript:"))], hrefs
    assert injected == 0  # the path's '<img src=x>' is text, not an element
    assert "file://" + quote(out) in hrefs, hrefs  # the output's link: the folder itself, percent-encoded
    assert run.name.startswith("generate[tiny] ")
    assert read_manifest(locate(out)).num_rows == 4
    if os.environ.get("IFBATCH_UPDATE_SCREENSHOT"):
        SCREENSHOT.write_bytes((tmp_path / "run.png").read_bytes())
    with api(server):
        arts = {a.type: a for a in artifacts_of(run.id)}
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
    assert f"(file://{quote(str(sheet))})" in md
    with Image.open(sheet) as im:
        assert im.size == (4 * 128, 128 + 14)


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


def tiny_params(prompts: str, out: str, tiny_dir, ray_cluster, *overrides: str) -> dict:
    """A run of the tiny cascade on the tests' cluster (ray_cluster None: in the run's own process, executor=local),
    in batches of 2 with a manifest part per batch: slow and fine-grained enough that a test can act while it runs."""
    batches = [f"{s}.batch_size=2" for s in ("text_encoder", "stage_1", "stage_2", "stage_3")]
    sets = [f"tiny.dir={tiny_dir}", "output.manifest_part_rows=2", *batches, *overrides]
    if ray_cluster is None:
        return {"prompts": prompts, "output": out, "preset": "tiny", "overrides": [*sets, "executor=local"]}
    return {"prompts": prompts, "output": out, "preset": "tiny", "overrides": sets, "ray_address": ray_cluster}


def test_cancel_stops_the_run_and_its_actors_and_a_rerun_resumes(server, served, tmp_path, tiny_dir, ray_cluster):
    """Cancel on a run that joined a Ray cluster: the run ends Cancelled, its actors go and its GPU is free, the
    cluster stays; what was done is in the manifest and the run record says cancelled; a rerun makes the rest."""
    import ray

    prompts = write_table(tmp_path / "p.parquet", {"prompt": [f"a photo of a dog number {i}" for i in range(12)]})
    out = str(tmp_path / "out")
    params = tiny_params(prompts, out, tiny_dir, ray_cluster)
    before = ray_actors_alive()
    with api(server):
        run = start(params, timeout=0)
        wait_for_records(out, run)
        assert ray_actors_alive() - before, "the run's stage actors are not on the cluster"
        cancel(run.id)
        final = wait_final(run.id, timeout=120)
    assert final.state.is_cancelled(), final.state
    deadline = time.monotonic() + 60  # the cluster reclaims a cancelled job's actors and placement groups
    while (ray_actors_alive() - before or ray.available_resources().get("GPU", 0) < 1) and time.monotonic() < deadline:
        time.sleep(1)
    left = ray_actors_alive() - before
    assert not left, f"the cancelled run's actors are still alive: {actor_names(left)}"
    assert ray.available_resources().get("GPU", 0) == ray.cluster_resources()["GPU"] == 1
    done = manifest_ids(out)
    assert 0 < len(done) < 12 and len(set(done)) == len(done)
    (stopped,) = run_records(out)
    assert stopped["status"] == "cancelled" and stopped["counts"]["done"] == len(done)
    assert not locate(out).fs.exists(locate(out).path(".ifbatch-lease.json"))  # the output is free again

    with api(server):  # (resume is the run engine's whatever runs the stream: the rerun runs it locally)
        again = start(tiny_params(prompts, out, tiny_dir, None))
    assert again.state.is_completed(), again.state.message
    ids = manifest_ids(out)
    assert len(ids) == 12 == len(set(ids))
    last = run_records(out)[-1]
    # images the cancelled run wrote whose records were still on their way are taken over, not made again
    assert last["counts"]["skipped"] == len(done) and last["counts"]["done"] + last["counts"]["adopted"] == 12 - len(
        done
    )


def test_two_runs_triggered_at_once_take_turns_on_the_gpus(server, served, tmp_path, tiny_dir):
    """Both runs complete; the second takes the machine's GPU slot only once the first has written its records.
    (The slot is Prefect's, whatever runs the stream: the runs use the local executor.)"""
    from ifbatch.flows.gpu_slot import slot_name

    prompts = write_table(tmp_path / "p.parquet", {"prompt": SMALL[:2]})
    outs = [str(tmp_path / "a"), str(tmp_path / "b")]
    with api(server):
        runs = [start(tiny_params(prompts, out, tiny_dir, None), timeout=0) for out in outs]
        finals = [wait_final(r.id) for r in runs]
        with client() as c:
            limit = c.read_global_concurrency_limit_by_name(slot_name(load_config("tiny").ray))
    assert all(f.state.is_completed() for f in finals), [f.state for f in finals]
    first, second = sorted((run_records(o)[-1] for o in outs), key=lambda r: r["gpu_slot"]["acquired_at"])
    assert first["gpu_slot"]["name"] == second["gpu_slot"]["name"] == limit.name and limit.limit == 1
    assert second["gpu_slot"]["acquired_at"] >= first["finished"]
    assert second["gpu_slot"]["waited_seconds"] > 0


STRICT_KEY, STRICT_SECRET = "vault-key", "vault-secret-d41d8cd98f00b204"


def test_s3_keys_and_a_c2pa_signer_from_prefect_blocks_reach_the_writers_and_nowhere_else(
    server, served, tmp_path, tiny_dir, ray_cluster
):
    """An AwsCredentials block holds the keys and endpoint of an S3 server that takes no others, and a Secret block
    a C2PA signer (tests/certs.py); the run names both. Its images land there, signed (the C2PA library reads the
    record's signer in each), and neither the S3 secret nor the signing key is in any parameter, log, artifact, run
    record or manifest, nor in the Prefect server's database (which keeps block values encrypted) or logs, the
    serving process's or the Ray cluster's logs."""
    import pyarrow.parquet as pq
    import ray
    import s3fs
    from prefect.blocks.system import Secret
    from prefect_aws import AwsClientParameters, AwsCredentials

    from ifbatch.tasks.outputs.credentials import signer_of

    folder = tmp_path / "vault"
    folder.mkdir()
    vault = SeaweedS3.accepting_only(folder, STRICT_KEY, STRICT_SECRET).start()
    try:
        fs = s3fs.S3FileSystem(endpoint_url=vault.endpoint, key=STRICT_KEY, secret=STRICT_SECRET)
        fs.mkdir("vault")
        prompts = write_table(tmp_path / "p.parquet", {"prompt": SMALL[:2]})
        out = "s3://vault/images"
        with api(server):
            AwsCredentials(
                aws_access_key_id=STRICT_KEY,
                aws_secret_access_key=STRICT_SECRET,
                aws_client_parameters=AwsClientParameters(endpoint_url=vault.endpoint),
            ).save("vault-keys", overwrite=True)
            chain = make_chain(tmp_path / "certs")
            Secret(value={"cert": chain.cert_file.read_text(), "key": chain.key_pem.decode()}).save(
                "signer", overwrite=True
            )
            signed = tiny_params(prompts, out, tiny_dir, ray_cluster, "output.c2pa.block=signer")
            params = {**signed, "aws_credentials": "vault-keys"}
            run = start(params)
            assert run.state.is_completed(), run.state.message
            texts = {"parameters": json.dumps(run.parameters), "state": str(run.state.message)}
            from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

            time.sleep(3)  # the run's last logs reach the API just after its final state
            with client() as c:
                logs = c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            texts["logs"] = "\n".join(entry.message for entry in logs)
            texts["artifacts"] = "\n".join(json.dumps(a.data) + str(a.description) for a in artifacts_of(run.id))
        objects = fs.find("vault/images")
        assert any(o.endswith(".png") for o in objects), objects  # the writers reached the store with the keys
        assert any("/manifest/" in o for o in objects) and any("/runs/" in o for o in objects)
        for o in objects:
            texts[o] = fs.cat_file(o).decode("latin-1")
        records = [r for o in objects if "/manifest/" in o for r in pq.read_table(fs.open(o)).to_pylist()]
        texts["manifest"] = json.dumps(records, default=str)
        assert len(records) == 2 and all(r["c2pa_signer"].startswith("ifbatch test signer;") for r in records)
        for r in records:
            assert signer_of(fs.cat_file(r["image_uri"].removeprefix("s3://"))) == r["c2pa_signer"]
        texts["serve log"] = served.log_path.read_text(errors="replace")
        for f in server.home.rglob("*"):  # its database (and any journal beside it) and its log
            if f.is_file():
                texts[str(f)] = f.read_bytes().decode("latin-1")
        session = Path(ray._private.worker._global_node.get_session_dir_path())
        for f in (session / "logs").rglob("*"):
            if f.is_file():
                texts[str(f)] = f.read_text(errors="replace")
    finally:
        vault.stop()
    assert len(texts["logs"]) > 0 and len(texts["artifacts"]) > 0
    assert any(name.endswith(".db") for name in texts), sorted(texts)
    leaks = [where for where, text in texts.items() if STRICT_SECRET in text]
    assert not leaks, f"the secret appears in {leaks}"
    leaks = [where for where, text in texts.items() if any(line in text for line in chain.key_lines)]
    assert not leaks, f"the signing key appears in {leaks}"
    assert all(line in chain.key_file.read_text() for line in chain.key_lines)  # (what is searched for: the key)


def test_retry_on_a_failed_run_resumes_into_the_same_output(server, served, tmp_path, tiny_dir, s3_server):
    """A run whose S3 store starts refusing writes mid-run ends Failed; once the store is back, the dashboard's
    Retry reruns it into the same output and makes only the images it had not recorded: every image once. (Retry
    is Prefect's, whatever runs the stream: the run uses the local executor.)"""
    from ..conftest import BUCKET

    proxy = FaultyS3Proxy(s3_server.endpoint)
    prompts = write_table(tmp_path / "p.parquet", {"prompt": [f"a photo of a cat number {i}" for i in range(8)]})
    out = f"s3://{BUCKET}/retry-{tmp_path.name}"
    sets = [f"s3.endpoint_url={proxy.endpoint}", "s3.retry_deadline_s=1"]
    try:
        with api(server):
            run = start(tiny_params(prompts, out, tiny_dir, None, *sets), timeout=0)
            wait_for_records(out, run)
            proxy.failing.set()  # from here every PUT fails
            failed = wait_final(run.id)
            assert failed.state.is_failed(), failed.state
            proxy.failing.clear()
            retry(run.id)
            retried = wait_final(run.id, runs=2)
    finally:
        proxy.stop()
    assert retried.state.is_completed(), retried.state.message
    ids = manifest_ids(out)
    assert len(ids) == 8 == len(set(ids))
    last = run_records(out)[-1]
    assert last["counts"]["skipped"] > 0 and last["counts"]["done"] == 8 - last["counts"]["skipped"]
