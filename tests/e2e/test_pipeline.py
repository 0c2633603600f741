"""The product end to end on real parts: Prefect flow -> Ray stage actors -> local folder or S3 (SeaweedFS): what
needs Prefect and Ray (the flow's task runs, placement on the GPU, the CLI's default path, a stage actor lost).
Each run property (resume, lease, store faults, bad rows, same bytes) is tested once on the run engine: tests/run."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ifbatch.configs.schema import STAGES
from ifbatch.flows.generate import GenerateParams, generate
from ifbatch.tasks.outputs.manifest import read_manifest
from ifbatch.tasks.storage import locate

from ..conftest import BUCKET
from ..helpers import EXAMPLES, SMALL, cli, each_image_once, read_bytes, write_table
from ..reference import Card, assert_final_images_are_the_cards

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny_set(tiny_dir):
    return [f"tiny.dir={tiny_dir}"]


def run_flow(prompts, output, overrides, **kw):
    state = generate(
        GenerateParams(prompts=prompts, output=output, preset="tiny", overrides=overrides, **kw), return_state=True
    )
    return state, state.result(raise_on_failure=False)


def test_bad_table_fails_before_any_model_loads(tmp_path, ray_cluster, prefect_api):
    prompts = write_table(tmp_path / "p.parquet", {"caption": ["a cat"]})
    never = tmp_path / "never-built"
    state, err = run_flow(prompts, str(tmp_path / "out"), [f"tiny.dir={never}"])
    assert state.is_failed() and "no column 'prompt'" in state.message
    assert not never.exists()  # the tiny cascade was not even built
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # the run's logs, sent in batches, are in the API
    with get_client(sync_client=True) as client:  # a table only the user can fix is not retried
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    assert [(r.name.split("-")[0], r.run_count, r.state.type.value) for r in runs] == [("preflight", 1, "FAILED")]
    assert "no column 'prompt'" in runs[0].state.message  # the task's state says why, in one line ...
    assert logs and not [g.message for g in logs if "Traceback" in g.message]  # ... with no traceback of it


def test_a_clusters_gcs_passes_reach_and_the_same_gcs_hung_is_refused(ray_cluster):
    """`reach` speaks to Ray's real GCS (gRPC's HTTP/2): it answers at once; stopped (SIGSTOP: its port still
    accepts connections) it is refused after the time given, and answers again once continued."""
    import psutil

    from ifbatch.tasks.stream.ray.session import ClusterUnreachable, reach

    reach(ray_cluster, "RAY_ADDRESS")
    port = int(ray_cluster.rsplit(":", 1)[1])
    gcs = [  # the process listening on the cluster's address
        p
        for p in psutil.process_iter(["cmdline"])
        if "gcs_server" in " ".join(p.info["cmdline"] or [])
        and any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in p.net_connections("tcp"))
    ]
    assert len(gcs) == 1, gcs
    gcs[0].suspend()
    try:
        stopped_whole(gcs[0])
        t0 = time.monotonic()
        with pytest.raises(ClusterUnreachable, match="accepted the connection but did not answer in 1 s"):
            reach(ray_cluster, "RAY_ADDRESS", timeout_s=1.0)
        assert time.monotonic() - t0 < 3
    finally:
        gcs[0].resume()
    reach(ray_cluster, "RAY_ADDRESS")


def stopped_whole(proc, timeout: float = 10) -> None:
    """Wait until every thread of a process sent SIGSTOP has stopped: kill() returns before a thread running on
    another core has, and such a thread can still answer a connection (once in a suite under load, the suspended
    GCS answered `reach`; the likely cause, not proven)."""
    deadline = time.monotonic() + timeout
    tasks = Path(f"/proc/{proc.pid}/task")
    while True:
        states = [(t / "stat").read_text().rsplit(") ", 1)[1][0] for t in tasks.iterdir()]
        if all(s in "Tt" for s in states):
            return
        assert time.monotonic() < deadline, states
        time.sleep(0.01)


def test_manual_placement_follows_the_config_and_auto_plans_the_gpu(tmp_path, tiny_set, ray_cluster, prefect_api):
    """The session's Ray cluster has 1 fake GPU. plan.mode=manual: each stage's actors get what the config asks,
    no placement group. Auto (the default): the plan's groups, recorded in the run record. The images of both
    runs are the model card's (tests/reference.py; every case on the local executor: tests/run/test_parity.py):
    a prompt with capitals and a custom negative, per-row parameters in the batch, best of 2."""
    table = {
        "prompt": [SMALL[0], "Two OWLS on a Fence at Night", "  A Red Car on the Beach "],
        "negative_prompt": [None, "Blurry, DARK", None],
        "stage_1_guidance_scale": [None, None, 9.5],
        "stage_3_noise_level": [None, None, 50],
    }
    prompts = write_table(tmp_path / "p.parquet", table)
    asks = ["plan.mode=manual", "text_encoder.num_gpus=0.25", "stage_1.num_gpus=0.5", "stage_3.num_gpus=0.25"]
    state, _ = run_flow(prompts, str(tmp_path / "manual"), [*tiny_set, *asks, "stage_2.num_gpus=0"])
    assert state.is_completed(), state.message
    for r in read_manifest(locate(str(tmp_path / "manual"))).to_pylist():
        p = json.loads(r["placement"])
        assert p["stage_1"]["gpus"] == ["0"] and p["stage_3"]["gpus"] == ["0"] and p["stage_2"]["gpus"] == []
        assert not any("pg" in s for s in p.values())
    # auto, with best of 2: the scorer is a stage of its own, planned and placed like the others
    state, summary = run_flow(prompts, str(tmp_path / "auto"), [*tiny_set, "data.candidates_per_image=2"])
    assert state.is_completed(), state.message
    record = json.loads(read_bytes(summary.run_record))
    assert record["plan"]["mode"] == "auto" and record["plan"]["gpus"] == 1
    assert record["plan"]["candidates_per_image"] == 2 and record["plan"]["cost_vs_one_candidate"] > 1
    assert {s: v["replicas"] for s, v in record["plan"]["stages"].items()} == dict.fromkeys(STAGES, 1)
    groups = set()
    for r in read_manifest(locate(str(tmp_path / "auto"))).to_pylist():
        p = json.loads(r["placement"])
        assert all(p[s]["gpus"] == ["0"] for s in STAGES), p
        groups |= {p[s]["pg"] for s in STAGES}
        assert len(r["candidate_scores"]) == 2 and r["candidate_scores"][r["candidate"]] == max(r["candidate_scores"])
        assert r["clip_score"] is not None and r["seconds_scorer"] > 0
    assert len(groups) == len(STAGES)  # one placement group per stage
    card = Card(tiny_set[0].removeprefix("tiny.dir="))
    for out in ("manual", "auto"):
        loc = locate(str(tmp_path / out))
        assert_final_images_are_the_cards(card, loc, read_manifest(loc).to_pylist())


def test_a_model_that_cannot_load_on_the_cluster_stops_the_run_saying_which(
    tmp_path, tiny_dir, ray_cluster, prefect_api
):
    """A stage actor loads its model after it is up (executor.loads_apart: the stages load at once); one whose
    weights are unreadable stops the run in one line naming the model and the file, and no image is recorded."""
    broken = tmp_path / "broken-cascade"
    shutil.copytree(tiny_dir, broken)
    weights = broken / "IF-II" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"not a safetensors file")
    prompts = write_table(tmp_path / "p.parquet", {"prompt": SMALL[:2]})
    t0 = time.monotonic()
    state, summary = run_flow(prompts, str(tmp_path / "out"), [f"tiny.dir={broken}"])
    assert state.is_failed() and time.monotonic() - t0 < 300
    assert "ModelLoadError: cannot load stage_2 model from" in state.message and str(weights) in state.message
    assert "Traceback" not in state.message and "\n" not in state.message.strip(), state.message
    assert not read_manifest(locate(str(tmp_path / "out"))).num_rows


def test_a_stage_actor_sent_sigterm_while_it_loads_leaves_without_a_crash_dump(ray_cluster):
    """`ray stop` or a node drained while a stage loads its models: the actor leaves at once. With Ray's own handler
    it aborted with a C++ stack dump (whether it loaded in its constructor or in a thread), which Ray forwards to
    the driver's terminal; 3 of 3 before."""
    import psutil
    import ray

    from ifbatch.tasks.stream.ray.startup import loads_apart

    class Loading:  # a load: minutes of work on real weights, seconds here
        name = "stage_3"

        def __init__(self):
            import torch

            t = time.monotonic()
            while time.monotonic() - t < 20:
                torch.randn(128, 128) @ torch.randn(128, 128)

        def __call__(self, batch):
            return batch

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for _ in range(2):
        actor = ray.remote(max_concurrency=2, num_cpus=0)(loads_apart(Loading)).remote()
        pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=120)  # up; its load under way
        time.sleep(1)
        os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).wait(timeout=30)
        (err,) = logs.glob(f"worker-*-{pid}.err")
        text = err.read_text()
        assert "SIGABRT" not in text and "Fatal Python error" not in text, text


def test_cli_rejects_bad_overrides_before_starting(tmp_path):
    res = cli("run", str(EXAMPLES), str(tmp_path / "out"), "--set", "stage_1.steps=-3", timeout=120)
    assert res.returncode == 2 and "stage_1.steps = -3" in res.stderr
    assert not (tmp_path / "out").exists()


def _start_and_wait_for_an_image(args: list[str], out: str, prefect_api: str) -> subprocess.Popen:
    """Start the run; return once its first image is in the output (written by a writer actor, right after stage
    III: the driver's first manifest part comes later, and under load it came once every stage's actors were done)."""
    run = subprocess.Popen(
        [str(Path(sys.executable).with_name("ifbatch")), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PREFECT_API_URL": prefect_api},
    )
    loc = locate(out)
    deadline = time.monotonic() + 300
    while not (loc.fs.exists(loc.path("images")) and loc.fs.find(loc.path("images"))):
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before the fault"
        time.sleep(0.2)
        loc.fs.invalidate_cache()
    return run


def _stage_actor_pids(stages: str = "123") -> list[int]:
    """The diffusion stage actors' processes on the session's cluster (Ray titles them after the stage class; other
    tests' clusters may run beside it), of `stages`."""
    import psutil
    import ray._private.state as state

    pids = []
    for info in state.actors().values():
        if info["State"] == "ALIVE" and info.get("Pid"):
            with contextlib.suppress(psutil.Error):
                if re.search(rf"MapBatches\(Stage[{stages}]Stage\)", " ".join(psutil.Process(info["Pid"]).cmdline())):
                    pids.append(info["Pid"])
    return sorted(pids)


def test_a_stage_actor_killed_mid_run_leaves_every_image_exactly_once(tmp_path, tiny_set, ray_cluster, prefect_api):
    """`ifbatch run` to S3 on Ray with Prefect (the CLI's default path), and mid-run (after the first image, with
    5 of stage III's 6 batches to go) the stage III actor SIGKILLed: Ray Data restarts the actor and retries its
    batch, the run completes, every image exactly once with its sha256. (Store faults: tests/run.)"""
    cats = [f"a photo of a cat number {i}" for i in range(12)]
    prompts = write_table(tmp_path / "p.parquet", {"prompt": cats})
    out = f"s3://{BUCKET}/fault-{tmp_path.name}"
    args = [
        "run", prompts, out, "--set", tiny_set[0], "--set", "output.manifest_part_rows=2",
        *[f"--set={s}.batch_size=2" for s in ("text_encoder", "stage_1", "stage_2", "stage_3")],
        "--ray-address", ray_cluster, "--no-progress",
    ]  # fmt: skip
    run = _start_and_wait_for_an_image(args, out, prefect_api)
    pids = _stage_actor_pids("3")
    assert pids, "no stage III actor process found"
    os.kill(pids[-1], signal.SIGKILL)
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-3000:]
    assert "12 images done, 0 failed, 0 skipped (already done) of 12 images from 12 rows, 0 rows rejected" in stdout
    each_image_once(out, prompts)
