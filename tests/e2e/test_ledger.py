"""The ledger a Ray run's writers share with the driver (tasks/stream/ray/ledger.py), on the session's Ray cluster and
the real S3 server, with the writers' own code called here: once the run is stopped no write starts, and every image
written whose record the driver had not taken is read back from the output, record for record what the writer
returned -- files and WebDataset shards, in a folder and on S3. (A whole stopped run on Ray: test_interrupts.)"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from ifbatch.configs import load_config
from ifbatch.tasks.outputs.writer import STOPPED, ImageWriter, ShardWriter
from ifbatch.tasks.storage import locate
from ifbatch.tasks.stream.ray.ledger import read_back, settle, start_ledger

from ..conftest import BUCKET
from ..helpers import writer_rows

pytestmark = pytest.mark.slow

MEASURED = {"written_at", "seconds_write", "placement", "min_clip_score"}


def batch(first: int, n: int) -> dict:
    b = writer_rows(np.random.default_rng(first).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8))
    b["id"] = np.array([f"img{i}" for i in range(first, first + n)], object)
    return b


@pytest.mark.parametrize(
    "where, layout", [("local", "files"), ("local", "webdataset"), ("s3", "files"), ("s3", "webdataset")]
)
def test_a_stopped_run_reads_back_every_image_written_that_the_driver_had_not_taken(
    where, layout, tmp_path, ray_cluster, s3_server
):
    out = str(tmp_path / "out") if where == "local" else f"s3://{BUCKET}/ledger-{tmp_path.name}"
    cfg = load_config("tiny", [f"output.format={layout}", "output.shard_samples=2"])
    ledger = start_ledger()
    encode = ImageWriter(cfg, out, {"stage_1": {"commit": "abc"}}, run_id="r", ledger=ledger)
    shards = ShardWriter(cfg, out, "r", ledger=ledger)

    def write(b: dict) -> pa.Table:
        records = encode(b)
        return records if layout == "files" else shards(records)

    taken = write(batch(0, 2))  # its records reached the driver
    ledger.received.remote(taken.column("id").to_pylist())
    lost = write(batch(2, 2))  # written; its records had not come when the run stopped
    written = settle(ledger)
    assert sorted(written) == ["img2", "img3"]
    late = read_back(written, locate(out), layout).to_pylist()
    want = {r["id"]: r for r in lost.to_pylist()}
    assert sorted(r["id"] for r in late) == ["img2", "img3"]
    same = lambda k: k not in MEASURED and not k.startswith("seconds_")  # noqa: E731  (the run's times)
    for r in late:
        assert {k: v for k, v in r.items() if same(k)} == {k: v for k, v in want[r["id"]].items() if same(k)}
    after = write(batch(4, 2))  # after the stop: nothing written
    assert after.column("error").to_pylist() == [STOPPED] * 2
    assert after.column("sha256" if layout == "files" else "shard").null_count == 2


def test_a_running_stream_is_stopped_from_another_thread(ray_cluster):
    """RaySession.close stops a stream the run no longer reads (Ctrl-C, a lost node) through Ray Data's private
    `_current_executor`: this fails when an upgrade of Ray Data moves it."""
    import contextlib
    import time

    import ray

    from ifbatch.tasks.stream.ray.executor import stop_stream

    def slow(batch):
        time.sleep(0.2)
        return batch

    ds = ray.data.range(200, override_num_blocks=200).map_batches(slow, batch_size=1)
    rows = iter(ds.iter_batches(batch_size=None))
    next(rows)
    assert stop_stream(ds), "Ray Data keeps no `_current_executor` on a running dataset: RaySession.close is blind"
    t0, rest = time.monotonic(), 0
    with contextlib.suppress(Exception):  # the stream ends, or fails: either way it stops
        for _ in rows:
            rest += 1
    assert rest < 100 and time.monotonic() - t0 < 30, (rest, time.monotonic() - t0)
