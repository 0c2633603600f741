"""The product end to end on real parts: Prefect flow -> Ray stage actors -> local folder or S3 (SeaweedFS)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from ifbatch.configs.schema import STAGES
from ifbatch.flows.generate import GenerateParams, generate
from ifbatch.tasks.inputs.expand import image_id, image_seed
from ifbatch.tasks.outputs.images import image_relpath
from ifbatch.tasks.outputs.manifest import part_paths, read_manifest
from ifbatch.tasks.outputs.shards import read_image, sample_key
from ifbatch.tasks.storage import locate

from .conftest import BUCKET
from .helpers import EXAMPLES, SMALL, cli, read_bytes, sha256, write_table

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny_set(tiny_dir):
    return [f"tiny.dir={tiny_dir}"]


def run_flow(prompts, output, overrides, **kw):
    state = generate(
        GenerateParams(prompts=prompts, output=output, preset="tiny", overrides=overrides, **kw), return_state=True
    )
    return state, state.result(raise_on_failure=False)


def check_outputs(output: str, expect_ids: set[str]) -> list[dict]:
    loc = locate(output)
    rows = read_manifest(loc).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(expect_ids)  # exactly one record per row
    for r in rows:
        assert r["status"] == "ok", r
        data = read_image(loc, r)
        assert sha256(data) == r["sha256"] and (r["width"], r["height"]) == (256, 256)
        if r["shard"] is None:
            assert r["image_uri"].endswith(image_relpath(r["id"], load_tiny().output).split("/", 1)[1])
        else:
            assert r["image_uri"] is None and r["member"] == f"{sample_key(r['id'])}.png"
        models = json.loads(r["models"])
        assert set(models) == {"text_encoder", "stage_1", "stage_2", "stage_3", "safety"}
        assert models["stage_1"]["dtype"] == "float32" and r["stage_1_steps"] == 4 and r["stage_3_noise_level"] == 100
        assert r["seconds_stage_3"] > 0 and r["watermarked"] is True
    return rows


def load_tiny():
    from ifbatch.configs import load_config

    return load_config("tiny")


def _ids(prompts: str) -> list[str]:
    from ifbatch.tasks.inputs.prompts import read_prompts

    return read_prompts(prompts, load_tiny()).rows.column("id").to_pylist()


def test_same_table_and_seeds_give_byte_identical_images(tmp_path, tiny_set, ray_cluster, prefect_api):
    prompts = write_table(tmp_path / "p.parquet", {"prompt": SMALL[:4], "seed": [1, 2, 3, 4]})
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    # (across batch sizes a row agrees within float32 rounding, not bit for bit: see test_models)
    assert run_flow(prompts, a, tiny_set)[0].is_completed()
    assert run_flow(prompts, b, tiny_set)[0].is_completed()
    ha = {r["id"]: r["sha256"] for r in read_manifest(locate(a)).to_pylist()}
    hb = {r["id"]: r["sha256"] for r in read_manifest(locate(b)).to_pylist()}
    assert ha == hb and len(ha) == 4


def test_overwrite_starts_over(tmp_path, tiny_set, ray_cluster, prefect_api):
    prompts = write_table(tmp_path / "p.parquet", {"prompt": SMALL[:2]})
    out = str(tmp_path / "out")
    run_flow(prompts, out, tiny_set)
    _, summary = run_flow(prompts, out, tiny_set, overwrite=True)
    assert (summary.done, summary.skipped) == (2, 0)
    assert read_manifest(locate(out)).num_rows == 2 and len(part_paths(locate(out))) == 1


def test_bad_table_fails_before_any_model_loads(tmp_path, ray_cluster, prefect_api):
    prompts = write_table(tmp_path / "p.parquet", {"caption": ["a cat"]})
    never = tmp_path / "never-built"
    state, err = run_flow(prompts, str(tmp_path / "out"), [f"tiny.dir={never}"])
    assert state.is_failed() and "no column 'prompt'" in state.message
    assert not never.exists()  # the tiny cascade was not even built
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:  # a table only the user can fix is not retried
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    assert [(r.name.split("-")[0], r.run_count, r.state.type.value) for r in runs] == [("preflight", 1, "FAILED")]


def test_manual_placement_follows_the_config_and_auto_plans_the_gpu(tmp_path, tiny_set, ray_cluster, prefect_api):
    """The session's Ray cluster has 1 fake GPU. plan.mode=manual: each stage's actors get what the config asks,
    no placement group. Auto (the default): the plan's groups, recorded in the run record."""
    prompts = write_table(tmp_path / "p.parquet", {"prompt": SMALL[:2]})
    asks = ["plan.mode=manual", "text_encoder.num_gpus=0.25", "stage_1.num_gpus=0.5", "stage_3.num_gpus=0.25"]
    state, _ = run_flow(prompts, str(tmp_path / "manual"), [*tiny_set, *asks, "stage_2.num_gpus=0"])
    assert state.is_completed(), state.message
    for r in read_manifest(locate(str(tmp_path / "manual"))).to_pylist():
        p = json.loads(r["placement"])
        assert p["stage_1"]["gpus"] == ["0"] and p["stage_3"]["gpus"] == ["0"] and p["stage_2"]["gpus"] == []
        assert not any("pg" in s for s in p.values())
    state, summary = run_flow(prompts, str(tmp_path / "auto"), tiny_set)
    assert state.is_completed(), state.message
    record = json.loads(read_bytes(summary.run_record))
    assert record["plan"]["mode"] == "auto" and record["plan"]["gpus"] == 1
    assert {s: v["replicas"] for s, v in record["plan"]["stages"].items()} == dict.fromkeys(STAGES, 1)
    groups = set()
    for r in read_manifest(locate(str(tmp_path / "auto"))).to_pylist():
        p = json.loads(r["placement"])
        assert all(p[s]["gpus"] == ["0"] for s in STAGES), p
        groups |= {p[s]["pg"] for s in STAGES}
    assert len(groups) == len(STAGES)  # one placement group per stage


def test_cli_example_table_to_s3(tiny_set, ray_cluster, prefect_api):
    out = f"s3://{BUCKET}/examples-run"
    res = cli(
        "run",
        str(EXAMPLES),
        out,
        "--set",
        tiny_set[0],
        "--ray-address",
        ray_cluster,
        "--no-progress",
        env={"PREFECT_API_URL": prefect_api},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "36 images done, 0 failed, 0 skipped (already done) of 36 images from 36 rows, 0 rows rejected" in res.stdout
    check_outputs(out, set(_ids(str(EXAMPLES))))


def test_cli_bad_rows_exit_non_zero(tmp_path, tiny_set, ray_cluster, prefect_api):
    """The row corpus (tests/unit/test_bad_input.py): every bad row rejected with its reason in the rejected-rows
    file, the good row made, exit status 1."""
    from .unit.test_bad_input import ROWS, row_corpus

    prompts, words = row_corpus(tmp_path / "rows.parquet")
    out = tmp_path / "out"
    res = cli(
        "run",
        prompts,
        str(out),
        "--set",
        tiny_set[0],
        "--ray-address",
        ray_cluster,
        "--no-progress",
        env={"PREFECT_API_URL": prefect_api},
    )
    assert res.returncode == 1, res.stderr[-3000:]
    n = len(ROWS) + 1
    assert f"1 images done, 0 failed, 0 skipped (already done) of 1 images from {n} rows, {n - 1} rows rejected" in (
        res.stdout
    )
    check_outputs(str(out), {"r0"})
    rejected = list((out / "runs").glob("*-rejected.parquet"))
    import pyarrow.parquet as pq

    reasons = {r["row"]: r["reason"] for r in pq.read_table(rejected[0]).to_pylist()}
    assert sorted(reasons) == list(range(1, n))
    for k, expect in enumerate(words, start=1):
        assert all(w in reasons[k] for w in expect), (expect, reasons[k])


def test_cli_rejects_bad_overrides_before_starting(tmp_path):
    res = cli("run", str(EXAMPLES), str(tmp_path / "out"), "--set", "stage_1.steps=-3", timeout=120)
    assert res.returncode == 2 and "stage_1.steps = -3" in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where, layout", [("local", "files"), ("s3", "webdataset")])
def test_cli_killed_mid_run_then_rerun_resumes_per_image(where, layout, tmp_path, tiny_set, ray_cluster, prefect_api):
    """Several images per prompt (data.images_per_prompt and a per-row n column), SIGKILL mid-run, rerun: every
    image exactly once, each with its own id, seed and prompt_id; the ones made before the kill are kept. As
    WebDataset shards: the shards hold every image exactly once (a shard the killed run wrote but did not record
    is removed by the rerun)."""
    n = [1, 3, None, 2, None, 4]  # null: data.images_per_prompt (2); 14 images in all
    cats = [f"a photo of a cat number {i}" for i in range(6)]
    prompts = write_table(tmp_path / "p.parquet", {"prompt": cats, "n": n})
    out = str(tmp_path / "out") if where == "local" else f"s3://{BUCKET}/kill-{tmp_path.name}"
    small_batches = [f"--set={s}.batch_size=2" for s in ("text_encoder", "stage_1", "stage_2", "stage_3")]
    args = [
        "run",
        prompts,
        out,
        "--set",
        tiny_set[0],
        "--set",
        "output.manifest_part_rows=2",
        "--set",
        "data.images_per_prompt=2",
        "--set",
        f"output.format={layout}",
        "--set",
        "output.shard_samples=2",
        *small_batches,
        "--ray-address",
        ray_cluster,
        "--no-progress",
    ]
    exe = Path(sys.executable).with_name("ifbatch")
    proc = subprocess.Popen(
        [str(exe), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PREFECT_API_URL": prefect_api},
    )
    loc = locate(out)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not part_paths(loc):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    before = {r["id"]: r for r in read_manifest(loc).to_pylist()}
    assert 0 < len(before) < 14
    cut_short = [Path(out, "manifest", "part-x.parquet.tmp-999"), Path(out, "images", "zz", "x.png.tmp-999")]
    for f in cut_short if where == "local" else []:  # what a write killed (or out of space) leaves aside
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"")
    res = cli("run", *args[1:], env={"PREFECT_API_URL": prefect_api})
    assert res.returncode == 0, res.stderr[-3000:]
    assert not any(f.exists() for f in cut_short)  # the rerun removed them: pyarrow.dataset(manifest/) reads
    assert "of 14 images from 6 rows" in res.stdout + res.stderr
    expect = _image_ids(prompts, ["data.images_per_prompt=2"])
    rows = check_outputs(out, set(expect))
    raw_ok = [i for p in part_paths(loc) for i in _part_ids(loc, p)]
    assert len(raw_ok) == len(set(raw_ok)) == 14  # no image was generated twice
    for r in rows:
        if r["id"] in before:  # finished before the kill: kept, not regenerated
            assert r["run_id"] == before[r["id"]]["run_id"] and r["sha256"] == before[r["id"]]["sha256"]
        row_id, seed = expect[r["id"]]
        assert (r["prompt_id"], r["seed"]) == (row_id, image_seed(seed, r["image_index"]))
        assert r["id"] == image_id(row_id, r["image_index"])
    by_prompt: dict[str, set] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], set()).add(r["sha256"])
    assert sorted(len(v) for v in by_prompt.values()) == [1, 2, 2, 2, 3, 4]  # each image of a prompt differs
    if layout == "webdataset":
        assert sorted(shard_samples(out)) == sorted(sample_key(i) for i in expect)


def shard_samples(output: str) -> list[str]:
    """The keys of every sample in the output's shards, read with the webdataset library (an s3:// output through
    fsspec), each image checked against its .json."""
    import webdataset as wds

    from ifbatch.tasks.outputs.shards import shard_paths

    loc = locate(output)
    urls = [loc.uri(p) for p in shard_paths(loc)]
    wds.gopen_schemes["s3"] = lambda url, mode="rb", bufsize=8192, **kw: fsspec.open(url, mode).open()
    keys = []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        assert sample_key(meta["id"]) == sample["__key__"] and sample["txt"].decode() == meta["prompt"]
        keys.append(sample["__key__"])
    return keys


def test_two_runs_into_one_output_the_second_refuses_or_waits(tmp_path, tiny_set, ray_cluster, prefect_api):
    """The output lease: a second run started while the first writes is refused at once, naming the first; with
    --wait it waits for the first to end and then finds every image done. Every image exactly once."""
    prompts = write_table(tmp_path / "p.parquet", {"prompt": SMALL[:4]})
    out = tmp_path / "out"
    args = ["run", prompts, str(out), "--set", tiny_set[0], "--ray-address", ray_cluster, "--no-progress"]
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    first = subprocess.Popen(
        [str(Path(sys.executable).with_name("ifbatch")), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    lease = out / ".ifbatch-lease.json"
    deadline = time.monotonic() + 300
    while not lease.exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first run ended before it took its lease"
        time.sleep(0.2)
    holder = json.loads(lease.read_text())["run_id"]
    refused = cli(*args, env={"PREFECT_API_URL": prefect_api})
    assert refused.returncode == 2 and f"is in use by run {holder} on" in refused.stderr, refused.stderr[-2000:]
    waited = cli(*args, "--wait", env={"PREFECT_API_URL": prefect_api})
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    assert waited.returncode == 0 and "0 images done, 0 failed, 4 skipped (already done)" in waited.stdout, (
        waited.stdout + waited.stderr[-2000:]
    )
    check_outputs(str(out), set(_ids(prompts)))
    loc = locate(str(out))
    raw_ok = [i for p in part_paths(loc) for i in _part_ids(loc, p)]
    assert sorted(raw_ok) == sorted(_ids(prompts)) and not lease.exists()


def test_a_store_failing_every_put_mid_run_stops_it_and_the_rerun_resumes(
    tmp_path, tiny_set, s3_server, ray_cluster, prefect_api
):
    """S3 answers every PUT with 500 for a while, mid-run (a fault-injecting proxy in front of SeaweedFS): the run
    retries for s3.retry_deadline_s, keeps the records it could not write in the spill folder, ends with exit 1
    and a message naming that folder; the rerun writes the spilled records first and makes the rest: every image
    exactly once, every sha256 matching."""
    from .services import FaultyS3Proxy

    proxy = FaultyS3Proxy(s3_server.endpoint)
    cats = [f"a photo of a cat number {i}" for i in range(8)]
    prompts = write_table(tmp_path / "p.parquet", {"prompt": cats})
    out = f"s3://{BUCKET}/faulty-{tmp_path.name}"
    args = [
        "run", prompts, out, "--set", tiny_set[0], "--set", f"s3.endpoint_url={proxy.endpoint}",
        "--set", "s3.retry_deadline_s=3", "--set", "output.manifest_part_rows=2",
        *[f"--set={s}.batch_size=2" for s in ("text_encoder", "stage_1", "stage_2", "stage_3")],
        "--ray-address", ray_cluster, "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "IFBATCH_SPILL_DIR": str(tmp_path / "spill")}
    try:
        run = subprocess.Popen(
            [str(Path(sys.executable).with_name("ifbatch")), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        loc = locate(out)
        deadline = time.monotonic() + 300
        while not part_paths(loc):
            assert run.poll() is None and time.monotonic() < deadline, "the run ended before the store failed"
            time.sleep(0.2)
        proxy.failing.set()  # from here every PUT fails
        stdout, stderr = run.communicate(timeout=600)
        assert run.returncode == 1, stderr[-3000:]
        assert "stopped after generation started" in stderr and str(tmp_path / "spill") in stderr, stderr[-3000:]
        assert "InternalError" in stderr and "Rerun the same command to resume" in stderr
        assert proxy.refused > 0
        proxy.failing.clear()
        spilled = [p for p in (tmp_path / "spill").rglob("*.parquet")]
        res = cli(*args, env={"PREFECT_API_URL": prefect_api, "IFBATCH_SPILL_DIR": str(tmp_path / "spill")})
        assert res.returncode == 0, res.stderr[-3000:]
        assert "of 8 images from 8 rows" in res.stdout
        check_outputs(out, set(_ids(prompts)))
        assert not [p for p in (tmp_path / "spill").rglob("*.parquet")]  # written by the rerun, then removed
        raw_ok = [i for p in part_paths(loc) for i in _part_ids(loc, p)]
        assert sorted(raw_ok) == sorted(_ids(prompts))  # no image made twice
        assert spilled  # the records it could not write were kept locally
    finally:
        proxy.stop()


def _start_and_wait_for_a_part(args: list[str], out: str, prefect_api: str) -> subprocess.Popen:
    run = subprocess.Popen(
        [str(Path(sys.executable).with_name("ifbatch")), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PREFECT_API_URL": prefect_api},
    )
    loc = locate(out)
    deadline = time.monotonic() + 300
    while not part_paths(loc):
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before the fault"
        time.sleep(0.2)
    return run


def _stage_actor_pids() -> list[int]:
    """The diffusion stage actors' processes (Ray names them after the stage class)."""
    out = subprocess.run(["pgrep", "-f", r"MapBatches\(Stage[123]Stage\)"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


FAULTS = ["s3 frozen 25 s", "s3 restarted", "stage actor killed"]


@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_mid_run_leaves_every_image_exactly_once(
    fault, tmp_path, tiny_set, s3_server, ray_cluster, prefect_api
):
    """Mid-run (after the first manifest part): the S3 server's processes stopped (SIGSTOP) for 25 s; or the
    server stopped and started again on the same data; or a stage actor SIGKILLed. Writes wait and retry within
    s3.retry_deadline_s, Ray Data restarts the actor and retries its batch: the run completes, every image exactly
    once with its sha256."""
    cats = [f"a photo of a cat number {i}" for i in range(6)]
    prompts = write_table(tmp_path / "p.parquet", {"prompt": cats})
    out = f"s3://{BUCKET}/fault-{tmp_path.name}"
    args = [
        "run", prompts, out, "--set", tiny_set[0], "--set", "output.manifest_part_rows=2",
        *[f"--set={s}.batch_size=2" for s in ("text_encoder", "stage_1", "stage_2", "stage_3")],
        "--ray-address", ray_cluster, "--no-progress",
    ]  # fmt: skip
    run = _start_and_wait_for_a_part(args, out, prefect_api)
    if fault == "s3 frozen 25 s":
        os.killpg(s3_server.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(25)
        finally:
            os.killpg(s3_server.proc.pid, signal.SIGCONT)
    elif fault == "s3 restarted":
        s3_server.restart(down_s=5)
    else:
        pids = _stage_actor_pids()
        assert pids, "no stage actor process found"
        os.kill(pids[-1], signal.SIGKILL)
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-3000:]
    check_outputs(out, set(_ids(prompts)))
    loc = locate(out)
    raw_ok = [i for p in part_paths(loc) for i in _part_ids(loc, p)]
    assert sorted(raw_ok) == sorted(_ids(prompts))  # no image recorded twice


def _image_ids(prompts: str, overrides: list[str]) -> dict[str, tuple[str, int]]:
    """{image id: (its row's id, the row's seed)} for every image the table asks for."""
    from ifbatch.configs import load_config
    from ifbatch.tasks.inputs.prompts import read_prompts

    rows = read_prompts(prompts, load_config("tiny", overrides)).rows.to_pylist()
    return {image_id(r["id"], k): (r["id"], r["seed"]) for r in rows for k in r["images"]}


def _part_ids(loc, path):
    import pyarrow.parquet as pq

    with loc.fs.open(path, "rb") as f:
        t = pq.read_table(f, columns=["id", "status"]).to_pylist()
    return [r["id"] for r in t if r["status"] == "ok"]
