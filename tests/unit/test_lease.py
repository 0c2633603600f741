"""The output lease on a folder: one holder at a time, a second run refused with the holder named or waiting for
it, a crashed holder's lease taken over (expired, or its process gone), renewal keeping it alive, races won once."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ifbatch.tasks.outputs.lease import LEASE, Lease, LeaseHeld
from ifbatch.tasks.storage import locate


def test_a_second_run_is_refused_naming_the_holder_then_takes_it_once_free(tmp_path):
    loc = locate(str(tmp_path / "out"))
    a, b = Lease(loc, "run-a"), Lease(loc, "run-b")
    a.acquire()
    with pytest.raises(LeaseHeld) as e:
        b.acquire()
    msg = str(e.value)
    assert "run run-a on" in msg and f"pid {os.getpid()}" in msg and a.started in msg and "--wait" in msg
    a.release()
    b.acquire()
    assert not (tmp_path / "out" / LEASE).read_bytes().count(b"run-a")
    b.release()
    assert not (tmp_path / "out" / LEASE).exists()


def test_wait_takes_the_lease_when_the_holder_ends(tmp_path):
    loc = locate(str(tmp_path))
    a, b = Lease(loc, "run-a"), Lease(loc, "run-b")
    a.acquire()
    threading.Timer(1.0, a.release).start()
    said = []
    t0 = time.monotonic()
    b.acquire(wait=True, poll_s=0.2, log=said.append)
    assert time.monotonic() - t0 >= 0.9 and "in use by run run-a" in said[0]


def test_an_expired_lease_is_taken_over_and_renewal_keeps_one_alive(tmp_path):
    loc = locate(str(tmp_path))
    with Lease(loc, "run-a", ttl_s=0.8).held():
        time.sleep(1.5)  # renewed every 0.2 s: still held
        with pytest.raises(LeaseHeld):
            Lease(loc, "run-b").acquire()
    crashed = Lease(loc, "run-c", ttl_s=0.5)
    crashed.acquire()  # and never renewed nor released
    time.sleep(0.7)
    Lease(loc, "run-d").acquire()  # expired


def test_a_lease_whose_process_is_gone_is_taken_over_at_once(tmp_path):
    code = (
        "import sys; sys.path[:0] = sys.argv[1:2]\n"
        "from ifbatch.tasks.outputs.lease import Lease\n"
        "from ifbatch.tasks.storage import locate\n"
        "Lease(locate(sys.argv[2]), 'run-killed', ttl_s=3600).acquire()\n"
    )
    subprocess.run([sys.executable, "-c", code, "", str(tmp_path)], check=True)  # exits holding it
    Lease(locate(str(tmp_path)), "run-next").acquire()


def test_of_many_racers_exactly_one_gets_the_lease(tmp_path):
    loc = locate(str(tmp_path))

    def race(i: int) -> bool:
        try:
            Lease(loc, f"run-{i}").acquire()
            return True
        except LeaseHeld:
            return False

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(race, range(8))) == 1


def test_compact_and_repair_refuse_while_a_run_holds_the_output(tmp_path, capsys):
    from ifbatch.flows import cli

    (tmp_path / "manifest").mkdir()
    with Lease(locate(str(tmp_path)), "run-live").held():
        assert cli.main(["compact", str(tmp_path)]) == 2
        assert "cannot compact" in capsys.readouterr().err
        assert cli.main(["verify", str(tmp_path), "--repair", "--no-progress"]) == 0  # whole: nothing to mend
        (tmp_path / "images").mkdir()
        (tmp_path / "images" / "stray.png").write_bytes(b"x")  # an orphan: not whole, so repair would write
        assert cli.main(["verify", str(tmp_path), "--repair", "--no-progress"]) == 2
        assert "cannot repair" in capsys.readouterr().err
    assert cli.main(["compact", str(tmp_path)]) == 0
