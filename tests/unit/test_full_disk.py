"""An output on a disk that fills up: a real 1 MiB tmpfs. The write that fails for space leaves no half file, the
error says the disk is full (no retries claimed, no "store down"), what it held is spilled; files a killed write
left aside are listed by verify and removed by --repair (and by the next run: tests/run/test_run.py)."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from ifbatch.tasks.outputs import spill
from ifbatch.tasks.outputs.manifest import MANIFEST_DIR
from ifbatch.tasks.outputs.verify import repair, verify
from ifbatch.tasks.storage import locate


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    assert res.returncode == 0, f"this test mounts a tmpfs (root): {res.stderr}"
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_write_that_fails_for_space_leaves_nothing_and_says_the_disk_is_full(small_disk, tmp_path, monkeypatch):
    monkeypatch.setattr(spill, "ROOT", tmp_path / "spill")
    loc = locate(str(small_disk / "out"))
    loc.write_bytes(loc.path("images", "a.png"), b"x" * 600_000)
    with pytest.raises(OSError) as e:
        loc.write_bytes(loc.path("images", "b.png"), b"y" * 600_000)
    assert e.value.errno == errno.ENOSPC
    assert sorted(os.listdir(small_disk / "out" / "images")) == ["a.png"]  # no b.png.tmp-<pid>
    with pytest.raises(spill.DiskFull) as full:
        spill.write_or_spill(loc, loc.path(MANIFEST_DIR, "part-1.parquet"), b"z" * 600_000)
    msg = str(full.value)
    assert "the disk is full (No space left on device)" in msg and "retried" not in msg
    assert isinstance(full.value, spill.StoreDown) and full.value.spilled.read_bytes() == b"z" * 600_000
    assert os.listdir(small_disk / "out" / MANIFEST_DIR) == []


def test_verify_lists_unfinished_writes_and_repair_removes_them(tmp_path):
    out = tmp_path / "out"
    for rel in ("images/ab/cd/x.png.tmp-4242", "manifest/part-9.parquet.tmp-4242", "runs/r.json.tmp-4242"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"")
    loc = locate(str(out))
    report, ok = verify(loc)
    assert not report.whole and report.count("unfinished") == 3 and "3 unfinished writes" in report.summary()
    fixed = repair(loc, report, ok)
    assert len(fixed.removed) == 3 and not loc.temp_files("images", "manifest", "runs")
    assert verify(loc)[0].whole
