"""One run record for every way a run ends: its exit status by one mapping, its line, and what it writes."""

from __future__ import annotations

import json
import signal

import pytest

from ifbatch.tasks.run_record import NOT_STARTED, Counts, RunParams, RunRecord, exit_code
from ifbatch.tasks.storage import locate


def ended(status: str, **fields) -> RunRecord:
    counts = Counts(total=4, images=8, done=3, failed=1 if status == "failed" else 0, skipped=2)
    return RunRecord(
        run_id="r1", output="/o", status=status, counts=counts, params=RunParams("p.parquet", "/o", overrides=("a=1",)),
        config={"preset": "tiny"}, started="s", finished="f", seconds=1.0, run_record="/o/runs/r1.json", **fields,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("status", "fields", "code"),
    [
        ("done", {}, 0),
        ("failed", {}, 1),
        ("stopped", {"reason": "StoreDown: x"}, 1),
        ("cancelled", {"reason": "Cancelled: the run was cancelled in Prefect"}, 1),
        ("interrupted", {"reason": "stopped by SIGINT", "signal": signal.SIGINT}, 130),
        ("interrupted", {"reason": "stopped by SIGTERM", "signal": signal.SIGTERM}, 143),
    ],
)
def test_each_way_a_run_ends_has_one_exit_status_and_a_line_that_says_where_its_record_is(status, fields, code):
    record = ended(status, **fields)
    assert exit_code(record) == record.exit_code == code
    assert "run record /o/runs/r1.json" in record.line
    if status not in ("done", "failed"):  # what was kept: done by this run and earlier ones
        assert (
            "5 of 8 images done and recorded (3 by this run)" in record.line and "Rerun the same command" in record.line
        )


def test_a_run_that_made_no_record_could_not_start():
    assert exit_code(None) == exit_code(ValueError("bad")) == NOT_STARTED == 2


def test_the_written_record_reads_back_with_its_status_counts_and_parameters(tmp_path):
    from ifbatch.tasks.outputs.records import write_run_record

    record = ended("stopped", reason="StoreDown: x", traceback="Traceback ...")
    loc = locate(str(tmp_path))
    uri = write_run_record(loc, record.run_id, record.to_json())
    back = json.loads(open(uri).read())
    assert back["status"] == "stopped" and back["counts"]["skipped"] == 2 and back["params"]["overrides"] == ["a=1"]
    assert back["traceback"] == "Traceback ..." and "signal" not in back and back["gpu_slot"] is None
