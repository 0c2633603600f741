"""The run layer: every property of a run -- same seeds same bytes, overwrite, resume after a kill, the output
lease, a store that fails or freezes mid-run, bad rows -- on the run engine with the local executor (no Prefect,
no Ray), on real files and a real S3 server. The same properties through Prefect and Ray once each: tests/e2e."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ifbatch.tasks.inputs.expand import image_id, image_seed
from ifbatch.tasks.outputs.manifest import part_paths, read_manifest
from ifbatch.tasks.outputs.shards import members, sample_key
from ifbatch.tasks.storage import locate

from ..conftest import BUCKET
from ..helpers import (
    SMALL,
    check_outputs,
    cli,
    each_image_once,
    image_ids,
    loaded_with_datasets,
    part_ids,
    read_bytes,
    sha256,
    shard_samples,
    write_table,
)
from .local import SMALL_BATCHES, local_args, run_local, start

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny_set(tiny_dir):
    return [f"tiny.dir={tiny_dir}"]


def test_same_table_and_seeds_give_byte_identical_images(tmp_path, tiny_set):
    prompts = write_table(tmp_path / "p.parquet", {"prompt": SMALL[:4], "seed": [1, 2, 3, 4]})
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    # (across batch sizes a row agrees within float32 rounding, not bit for bit: see test_models)
    assert run_local(prompts, a, tiny_set).ok and run_local(prompts, b, tiny_set).ok
    ha = {r["id"]: r["sha256"] for r in read_manifest(locate(a)).to_pylist()}
    hb = {r["id"]: r["sha256"] for r in read_manifest(locate(b)).to_pylist()}
    assert ha == hb and len(ha) == 4
    record = json.loads(read_bytes(str(next((tmp_path / "a" / "runs").glob("*.json")))))
    assert record["plan"]["mode"] == "local" and record["config"]["executor"] == "local"
    # the first image came once the models had loaded: after the start-up, within the run
    assert record["startup_seconds"] < record["first_image_seconds"] < record["seconds"], record


def test_overwrite_starts_over(tmp_path, tiny_set):
    prompts = write_table(tmp_path / "p.parquet", {"prompt": SMALL[:2]})
    out = str(tmp_path / "out")
    run_local(prompts, out, tiny_set)
    summary = run_local(prompts, out, tiny_set, overwrite=True)
    assert (summary.counts.done, summary.counts.skipped) == (2, 0)
    assert read_manifest(locate(out)).num_rows == 2 and len(part_paths(locate(out))) == 1


class Cancel(BaseException):
    """Stands for Prefect's TerminationSignal: how a Cancel reaches a run in a deployment (not an Exception)."""


def test_a_run_cancelled_mid_stream_records_it_while_its_executor_still_stands(tmp_path, tiny_set):
    """The run writes its `cancelled` record as soon as the cancel reaches it, before its executor's session (the
    cluster, on Ray) is closed -- a teardown that hangs can outlast the 30 s Prefect gives a cancelled run before
    SIGKILL -- and re-raises it. (Cancel on a real work pool: tests/e2e/test_work_pool.py.)"""
    import contextlib

    from ifbatch.configs import load_config
    from ifbatch.tasks.run import Run
    from ifbatch.tasks.stream.local import LocalExecutor

    prompts = write_table(tmp_path / "p.parquet", {"prompt": SMALL[:4]})
    out = str(tmp_path / "out")
    at_close: list[list[str]] = []

    class Watched(LocalExecutor):
        @contextlib.contextmanager
        def open(self, *args, **kwargs):
            with super().open(*args, **kwargs) as session:
                try:
                    yield session
                finally:  # what a cluster torn down from outside would no longer let the run write
                    at_close.append(sorted(p.name for p in Path(out, "runs").glob("*.json")))

    def cancel_after_the_first_images(run_id, images):
        def on(progress):
            if progress.done:
                raise Cancel()

        return on

    overrides = [*tiny_set, *SMALL_BATCHES, "output.manifest_part_rows=2", "executor=local"]
    run = Run(
        {"prompts": prompts, "output": out, "overrides": overrides},
        load_config("tiny", overrides),
        cancels=(Cancel,),
        listeners=[cancel_after_the_first_images],
        executor=Watched(),
    )
    with pytest.raises(Cancel):
        run()
    (record,) = [json.loads(p.read_text()) for p in Path(out, "runs").glob("*.json")]
    assert at_close == [[f"{record['run_id']}.json"]]  # written before the session closed, and once
    done = [r["id"] for r in read_manifest(locate(out)).to_pylist() if r["status"] == "ok"]
    assert record["status"] == "cancelled" and record["counts"]["done"] == len(done) == 2
    assert not Path(out, ".ifbatch-lease.json").exists()  # the output is free again


def test_bad_rows_exit_non_zero(tmp_path, tiny_set):
    """The row corpus (tests/unit/test_bad_input.py): every bad row rejected with its reason in the rejected-rows
    file, the good row made, exit status 1."""
    from ..unit.test_bad_input import ROWS, row_corpus

    prompts, words = row_corpus(tmp_path / "rows.parquet")
    out = tmp_path / "out"
    res = cli(*local_args(prompts, str(out), tiny_set))
    assert res.returncode == 1, res.stderr[-3000:]
    n = len(ROWS) + 1
    assert f"1 images done, 0 failed, 0 skipped (already done) of 1 images from {n} rows, {n - 1} rows rejected" in (
        res.stdout
    )
    check_outputs(str(out), {"r0"})
    rejected = list((out / "runs").glob("*-rejected.parquet"))
    reasons = {r["row"]: r["reason"] for r in pq.read_table(rejected[0]).to_pylist()}
    assert sorted(reasons) == list(range(1, n))
    for k, expect in enumerate(words, start=1):
        assert all(w in reasons[k] for w in expect), (expect, reasons[k])


def _wait_for_a_part(proc: subprocess.Popen, out: str, timeout: float = 300) -> None:
    loc = locate(out)
    deadline = time.monotonic() + timeout
    while not part_paths(loc):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first manifest part"
        time.sleep(0.1)


def _units(loc, layout: str) -> dict[str, tuple]:
    """Every image file (or shard) in the output: its path -> (bytes' sha256, modification time)."""
    base = loc.path("images" if layout == "files" else "shards")
    loc.fs.invalidate_cache()
    if not loc.fs.exists(base):
        return {}
    ext = ".png" if layout == "files" else ".tar"
    found = {}
    for path, info in loc.fs.find(base, detail=True).items():
        if path.endswith(ext):
            when = info.get("LastModified") or info.get("mtime")
            found[path] = (sha256(loc.fs.cat_file(path)), str(when))
    return found


def _whole_unrecorded(loc, layout: str) -> set[str]:
    """The ids of the images whole in the output (a file, or a sample of a shard) that no record names."""
    recorded = {r["id"] for r in read_manifest(loc).to_pylist() if r["status"] == "ok"}
    if layout == "files":
        return {p.rsplit("/", 1)[-1][: -len(".png")] for p in _units(loc, layout)} - recorded
    keys = set()
    for path in _units(loc, layout):
        keys |= {name.split(".", 1)[0] for name, _, _ in members(loc.fs.cat_file(path)) if name.endswith(".png")}
    return {k.replace("%2E", ".") for k in keys} - recorded


# Each layout and each store once (local files are taken over in tests/e2e/test_interrupts.py too, after a SIGKILL of
# a run on Ray); the files a killed write leaves aside, of every kind, on the local store.
@pytest.mark.parametrize("where, layout", [("local", "webdataset"), ("s3", "files")])
def test_killed_mid_run_then_rerun_takes_over_every_whole_image(where, layout, tmp_path, tiny_set, s3_server):
    """SIGKILL mid-run (an OOM kill, a preempted VM, `kill -9`) with records held back, so that images are whole
    in the output without records; rerun: every image whole before the kill is taken over as it is (its bytes and
    modification time unchanged: not made again), the rerun makes exactly the rest (`counts.done`) and says how
    many it took over (`counts.adopted`); every image once, each with its own id, seed and prompt_id. As WebDataset
    shards: a shard closed whole is taken over, the shards hold every image exactly once. Files a killed write left
    aside are removed by the rerun."""
    n = [1, 3, None, 2, None, 4]  # null: data.images_per_prompt (2); 14 images in all
    cats = [f"a photo of a cat number {i}" for i in range(6)]
    prompts = write_table(tmp_path / "p.parquet", {"prompt": cats, "n": n})
    out = str(tmp_path / "out") if where == "local" else f"s3://{BUCKET}/kill-{tmp_path.name}"
    sets = [
        *tiny_set, "data.images_per_prompt=2", f"output.format={layout}", "output.shard_samples=2", *SMALL_BATCHES,
    ]  # fmt: skip
    held = ["output.manifest_part_rows=6", "output.manifest_flush_seconds=600"]  # a part per 6 records: 4 held
    proc = start(local_args(prompts, out, [*sets, *held]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    loc = locate(out)
    deadline = time.monotonic() + 300
    while len(_units(loc, layout)) < (8 if layout == "files" else 4):  # 8 images
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # the local executor: the run is this one process
    proc.wait(30)
    before = {r["id"]: r for r in read_manifest(loc).to_pylist()}
    whole = _whole_unrecorded(loc, layout)
    units = _units(loc, layout)
    assert 0 < len(before) + len(whole) < 14 and whole, (len(before), whole)
    cut_short = [Path(out, "manifest", "part-x.parquet.tmp-999"), Path(out, "images", "zz", "x.png.tmp-999")]
    cut_short += [Path(out, "shards", "x.tar.tmp-999")]  # a shard cut short: dropped, its images made again
    for f in cut_short if where == "local" else []:  # what a write killed (or out of space) leaves aside
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"")
    res = cli(*local_args(prompts, out, sets))
    assert res.returncode == 0, res.stderr[-3000:]
    assert not any(f.exists() for f in cut_short)  # the rerun removed them: pyarrow.dataset(manifest/) reads
    said = res.stdout + res.stderr
    line = f"{14 - len(before) - len(whole)} images done, 0 failed, {len(before)} skipped (already done), "
    assert line + f"{len(whole)} taken over" in said, said[-3000:]
    (record,) = [json.loads(read_bytes(loc.uri(p))) for p in loc.fs.glob(loc.path("runs", "*.json"))
                 if json.loads(read_bytes(loc.uri(p))).get("counts", {}).get("adopted") is not None]  # fmt: skip
    assert record["counts"]["adopted"] == len(whole) and record["counts"]["done"] == 14 - len(before) - len(whole)
    after = _units(loc, layout)
    assert {p: after.get(p) for p in units} == units  # every unit whole before the kill: same bytes, same time
    expect = image_ids(prompts, ["data.images_per_prompt=2"])
    rows = check_outputs(out, set(expect))
    raw_ok = [i for p in part_paths(loc) for i in part_ids(loc, p)]
    assert len(raw_ok) == len(set(raw_ok)) == 14  # no image was recorded twice
    for r in rows:
        if r["id"] in before:  # recorded before the kill: kept
            assert r["run_id"] == before[r["id"]]["run_id"] and r["sha256"] == before[r["id"]]["sha256"]
        if r["id"] in whole:  # taken over: recorded by the rerun, not timed
            assert r["run_id"] == record["run_id"] and r["seconds_stage_3"] is None
        row_id, seed = expect[r["id"]]
        assert (r["prompt_id"], r["seed"]) == (row_id, image_seed(seed, r["image_index"]))
        assert r["id"] == image_id(row_id, r["image_index"])
    by_prompt: dict[str, set] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], set()).add(r["sha256"])
    assert sorted(len(v) for v in by_prompt.values()) == [1, 2, 2, 2, 3, 4]  # each image of a prompt differs
    if layout == "webdataset":
        assert sorted(shard_samples(out)) == sorted(sample_key(i) for i in expect)
    else:  # the killed run's records too are in images/<ab>/metadata.parquet, not only the folders the rerun wrote
        assert loaded_with_datasets(out, str(tmp_path / "hf")) == set(expect)
    assert not loc.fs.glob(loc.path("runs", "*.open")) and not loc.fs.glob(loc.path("runs", "*.behind"))


def test_two_runs_into_one_output_the_second_refuses_or_waits(tmp_path, tiny_set):
    """The output lease: a second run started while the first writes is refused at once, naming the first; with
    --wait it waits for the first to end and then finds every image done. Every image exactly once."""
    prompts = write_table(tmp_path / "p.parquet", {"prompt": SMALL[:4]})
    out = tmp_path / "out"
    args = local_args(prompts, str(out), [*tiny_set, *SMALL_BATCHES])
    first = start(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lease = out / ".ifbatch-lease.json"
    deadline = time.monotonic() + 300
    while not lease.exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first run ended before it took its lease"
        time.sleep(0.1)
    holder = json.loads(lease.read_text())["run_id"]
    refused = cli(*args)
    assert refused.returncode == 2 and f"is in use by run {holder} on" in refused.stdout + refused.stderr, (
        refused.stdout + refused.stderr[-2000:]
    )
    waited = cli(*args, "--wait")
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    assert waited.returncode == 0 and "0 images done, 0 failed, 4 skipped (already done)" in waited.stdout, (
        waited.stdout + waited.stderr[-2000:]
    )
    each_image_once(str(out), prompts)
    assert not lease.exists()


def test_a_store_failing_every_put_mid_run_stops_it_and_the_rerun_resumes(tmp_path, tiny_set, s3_server):
    """S3 answers every PUT with 500 for a while, mid-run (a fault-injecting proxy in front of SeaweedFS): the run
    retries for s3.retry_deadline_s, keeps the records it could not write in the spill folder, ends with exit 1
    and a message naming that folder; the rerun writes the spilled records first and makes the rest: every image
    exactly once, every sha256 matching."""
    from ..services import FaultyS3Proxy

    proxy = FaultyS3Proxy(s3_server.endpoint)
    cats = [f"a photo of a cat number {i}" for i in range(8)]
    prompts = write_table(tmp_path / "p.parquet", {"prompt": cats})
    out = f"s3://{BUCKET}/faulty-{tmp_path.name}"
    sets = [
        *tiny_set, f"s3.endpoint_url={proxy.endpoint}", "s3.retry_deadline_s=1", "output.manifest_part_rows=2",
        *SMALL_BATCHES,
    ]  # fmt: skip
    args = local_args(prompts, out, sets)
    # botocore retries a 500 itself (AWS_MAX_ATTEMPTS, 5 by default: up to ~15 s a call, ~40 s of this run):
    # turned off, so that what the test times is the run's own s3.retry_deadline_s
    env = {"IFBATCH_SPILL_DIR": str(tmp_path / "spill"), "AWS_MAX_ATTEMPTS": "1"}
    try:
        run = start(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for_a_part(run, out)
        proxy.failing.set()  # from here every PUT fails
        assert run.poll() is None, "the run ended before the store failed"
        stdout, stderr = run.communicate(timeout=600)
        assert run.returncode == 1, stderr[-3000:]
        assert "stopped after generation started" in stderr and str(tmp_path / "spill") in stderr, stderr[-3000:]
        assert "InternalError" in stderr and "Rerun the same command to resume" in stderr
        assert "Traceback" not in stdout + stderr  # one line says why; the whole cause is in the run record
        records = [json.loads(p.read_text()) for p in (tmp_path / "spill").rglob("*.json")]
        assert [r["status"] for r in records] == ["stopped"] and "InternalError" in records[0]["traceback"]
        assert proxy.refused > 0
        proxy.failing.clear()
        spilled = [p for p in (tmp_path / "spill").rglob("*.parquet")]
        res = cli(*args, env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "of 8 images from 8 rows" in res.stdout
        each_image_once(out, prompts)
        assert not [p for p in (tmp_path / "spill").rglob("*.parquet")]  # written by the rerun, then removed
        assert spilled  # the records it could not write were kept locally
    finally:
        proxy.stop()


@pytest.mark.parametrize("fault", ["s3 frozen 12 s", "s3 restarted"])
def test_a_store_fault_mid_run_leaves_every_image_exactly_once(fault, tmp_path, tiny_set, s3_server):
    """Mid-run (after the first manifest part): the S3 server's processes stopped (SIGSTOP) for 12 s, or the server
    stopped and started again on the same data. Writes wait and retry within s3.retry_deadline_s: the run
    completes, every image exactly once with its sha256. (A stage actor killed mid-run: tests/e2e, on Ray.)"""
    cats = [f"a photo of a cat number {i}" for i in range(16)]
    prompts = write_table(tmp_path / "p.parquet", {"prompt": cats})
    out = f"s3://{BUCKET}/fault-{tmp_path.name}"
    args = local_args(prompts, out, [*tiny_set, "output.manifest_part_rows=2", *SMALL_BATCHES])
    run = start(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_a_part(run, out)
    assert run.poll() is None, "the run ended before the fault"
    if fault == "s3 frozen 12 s":
        os.killpg(s3_server.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(12)
        finally:
            os.killpg(s3_server.proc.pid, signal.SIGCONT)
    else:
        s3_server.restart(down_s=5)
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-3000:]
    each_image_once(out, prompts)


def test_what_the_session_has_to_say_mid_run_is_said_when_it_happens(tmp_path, tiny_set):
    """A re-plan from the run's first images (Calibration, on Ray) was logged only after the stream ended, after
    `progress: 64/64`. What an executor says goes to the run's log when it says it: here a local session that says
    something once 2 of 6 images are out (the local executor, as it runs; only what it says is the test's)."""
    import contextlib
    import logging

    from ifbatch.configs import load_config
    from ifbatch.tasks.run import Run
    from ifbatch.tasks.stream.local import LocalExecutor, LocalSession

    class Talking(LocalSession):
        say = print

        def records(self, *args):
            out = 0
            for records in super().records(*args):
                out += records.num_rows
                if out >= 2 and self.say is not None:
                    self.say(f"re-planned after {out} images")
                    self.say = None
                yield records

    class Executor(LocalExecutor):
        @contextlib.contextmanager
        def open(self, cfg, explicit, images, loc, say):
            talking = Talking(cfg, self)
            talking.say = say
            yield talking

    heard: list[str] = []

    class Ear(logging.Handler):
        def emit(self, record):
            heard.append(record.getMessage())

    log = logging.getLogger("test.talking")
    log.addHandler(Ear())
    log.setLevel(logging.INFO)
    prompts = write_table(tmp_path / "p.parquet", {"prompt": SMALL[:6]})
    sets = [*tiny_set, *SMALL_BATCHES, "executor=local"]
    cfg = load_config("tiny", sets)
    Run({"prompts": prompts, "output": str(tmp_path / "out"), "overrides": sets}, cfg, log=log,
        executor=Executor(), log_every_s=0.0)()  # fmt: skip
    said = next(i for i, line in enumerate(heard) if line.startswith("re-planned after"))
    last = next(i for i, line in enumerate(heard) if line.startswith("progress: 6/6"))
    assert said < last, heard


def test_a_cluster_address_that_does_not_answer_is_refused_before_anything_starts(tmp_path):
    """`ifbatch run` and `ifbatch plan` with a dead head's address: exit 2 in seconds, naming the address and where
    it came from (Ray waited for minutes, then for ever). `ifbatch run` says it before Prefect starts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    prompts = write_table(tmp_path / "p.parquet", {"prompt": SMALL[:2]})
    t0 = time.monotonic()
    res = cli("run", prompts, str(tmp_path / "out"), "--no-progress", env={"RAY_ADDRESS": dead}, timeout=120)
    assert res.returncode == 2 and f"Ray cluster '{dead}' (RAY_ADDRESS) does not answer" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and "prefect" not in res.stderr.lower()
    res = cli("plan", prompts, "--ray-address", dead, timeout=120)
    assert res.returncode == 2 and f"Ray cluster '{dead}' (--ray-address) does not answer" in res.stdout + res.stderr
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_run_stopped_while_it_waits_on_a_hung_cluster_says_so(sig, tmp_path):
    """A head whose port accepts and never answers (hung): Ctrl-C or SIGTERM while `ifbatch run` waits on it ends
    the run at once with its line and 128 + the signal, not a KeyboardInterrupt traceback or a silent death."""
    import socket

    prompts = write_table(tmp_path / "p.parquet", {"prompt": SMALL[:2]})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        hung = f"127.0.0.1:{s.getsockname()[1]}"
        run = start(["run", prompts, str(tmp_path / "out"), "--ray-address", hung], stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True)  # fmt: skip
        s.settimeout(60)
        conn, _ = s.accept()  # the run is in the check, waiting for the head's first frame
        with conn:
            t0 = time.monotonic()
            run.send_signal(sig)
            _, stderr = run.communicate(timeout=30)
    assert run.returncode == 128 + sig, stderr[-3000:]
    assert f"interrupted ({sig.name}) before any image was made" in stderr and "Traceback" not in stderr
    assert time.monotonic() - t0 < 10
