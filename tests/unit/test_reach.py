"""Reaching a Ray cluster is bounded (tasks/stream/ray/session.py `reach`): an address that does not answer is
refused at once, naming the address as given and where it came from. Ray itself retried a dead head for minutes,
then for ever, saying only `Failed to connect to GCS` with another address."""

from __future__ import annotations

import socket
import time

import pytest

from ifbatch.tasks.stream.ray.session import ClusterUnreachable, reach


def test_an_address_nothing_listens_on_is_refused_at_once_naming_it_and_where_it_came_from():
    with socket.socket() as s:  # a port just freed: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(ClusterUnreachable, match=rf"Ray cluster '127.0.0.1:{port}' \(RAY_ADDRESS\) does not answer"):
        reach(f"127.0.0.1:{port}", "RAY_ADDRESS")
    with pytest.raises(ClusterUnreachable, match=rf"'ray://127.0.0.1:{port}' \(--ray-address"):
        reach(f"ray://127.0.0.1:{port}", "--ray-address / ray.address")
    assert time.monotonic() - t0 < 5


def test_a_port_that_accepts_and_says_nothing_or_is_not_grpc_is_refused_and_nonsense_is_named():
    """A port that accepts connections and says nothing -- a hung head: the kernel accepts for it -- is refused
    after the time given, and a server that is not gRPC at once. (A real GCS passes, and the same GCS stopped with
    SIGSTOP is refused: tests/e2e/test_pipeline.py.)"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        t0 = time.monotonic()
        with pytest.raises(ClusterUnreachable, match=r"accepted the connection but did not answer in 1 s"):
            reach(f"127.0.0.1:{s.getsockname()[1]}", "RAY_ADDRESS", timeout_s=1.0)
        assert time.monotonic() - t0 < 3
    with socket.socket() as s:  # a server that closes the connection (not gRPC)
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        import threading

        def close_each():
            conn, _ = s.accept()
            conn.recv(100)
            conn.close()

        threading.Thread(target=close_each, daemon=True).start()
        with pytest.raises(ClusterUnreachable, match=r"is not a Ray cluster \(no gRPC\)"):
            reach(f"127.0.0.1:{port}", "RAY_ADDRESS", timeout_s=5.0)
    with pytest.raises(ClusterUnreachable, match=r"'head-node' \(RAY_ADDRESS\): expected host:port"):
        reach("head-node", "RAY_ADDRESS")
    # (`auto`: the address a `ray start` recorded, else any cluster running on this machine, as Ray finds it: the
    # same check on that address; not tested here, where the suite's own clusters run)
