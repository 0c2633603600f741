"""One code path for ./out, file:// and s3:// URIs (fsspec; s3fs for S3). Credentials come from the environment, or
from the config's `s3.credentials` (a Prefect block's keys: flows/blocks.py), which then win."""

from __future__ import annotations

import contextlib
import os
import posixpath
import random
import time
from dataclasses import dataclass
from typing import Any

import fsspec

from ifbatch.configs.schema import S3Config


def storage_errors() -> tuple[type[BaseException], ...]:
    """What an unreachable or refusing store raises: OSError (local, and S3 errors s3fs translates) and botocore's
    own connection errors, which s3fs lets through."""
    from botocore.exceptions import BotoCoreError

    return (OSError, BotoCoreError)


# S3 error codes that may pass: the store is busy or briefly failing (s3fs already retries dropped connections a
# few times; these are retried on top, for up to the deadline).
TRANSIENT_CODES = {
    "500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "Throttling",
    "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
}  # fmt: skip


def store_code(e: BaseException | None) -> str | None:
    """The store's own error code (S3's `AccessDenied`, `NoSuchBucket` ...) behind an exception, if it has one."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        response = getattr(e, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code"):
            return str(response["Error"]["Code"])
        e = e.__cause__ or e.__context__
    return None


def transient(e: BaseException) -> bool:
    """Whether a store error may pass if retried: a 5xx or throttling code, or a connection that failed."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    code = store_code(e)
    if code is not None:
        return code in TRANSIENT_CODES
    chain, seen = e, set()
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, BotoConnectionError | HTTPClientError | ConnectionError | TimeoutError):
            return True
        chain = chain.__cause__ or chain.__context__
    return False


TMP_MARK = ".tmp-"  # a local write's file aside, before the rename that makes it whole


@dataclass(frozen=True)
class Location:
    """A filesystem plus a root path on it; `uri()` gives back full URIs for the manifest."""

    fs: Any
    root: str
    protocol: str
    retry_s: float = 0.0  # how long a write to a remote store retries transient errors

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def uri(self, path: str) -> str:
        return path if self.protocol == "file" else f"{self.protocol}://{path}"

    def write_bytes(self, path: str, data: bytes) -> None:
        """Durable once it returns: an S3 PUT is atomic; a local file is written aside, synced, then renamed."""
        if self.protocol != "file":
            self.retrying(lambda: self.fs.pipe_file(path, data))
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}{TMP_MARK}{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:  # a full disk, a killed write: no half file stays behind
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise

    def temp_files(self, *folders: str) -> list[str]:
        """Files a local write left aside (`<name>.tmp-<pid>`: killed before it could remove them) under these
        folders of the output. An S3 output has none (a PUT is whole or absent)."""
        if self.protocol != "file":
            return []
        found = []
        for folder in folders:
            base = self.path(folder)
            for top, _, names in os.walk(base):
                found += [posixpath.join(top, n) for n in names if TMP_MARK in n]
        return sorted(found)

    def retrying(self, fn, first_wait_s: float = 0.5, max_wait_s: float = 15.0):
        """fn(), retried with exponential backoff and jitter while it fails with a transient store error, for up to
        retry_s seconds; then the last error is raised."""
        deadline = time.monotonic() + self.retry_s
        wait = first_wait_s
        while True:
            try:
                return fn()
            except storage_errors() as e:
                if not transient(e) or time.monotonic() + wait > deadline:
                    raise
            time.sleep(wait * random.uniform(0.5, 1.0))
            wait = min(2 * wait, max_wait_s)


def storage_options(uri: str, s3: S3Config | None) -> dict[str, Any]:
    if not uri.startswith("s3://") or s3 is None:
        return {}
    client = {k: v for k, v in {"endpoint_url": s3.endpoint_url, "region_name": s3.region}.items() if v}
    options: dict[str, Any] = {"client_kwargs": client} if client else {}
    if s3.credentials is not None:
        c = s3.credentials
        options.update(key=c.key.get_secret_value(), secret=c.secret.get_secret_value())
        if c.token is not None:
            options["token"] = c.token.get_secret_value()
    return options


def locate(uri: str, s3: S3Config | None = None) -> Location:
    """Resolve a local path or URI into a Location (the root is not created)."""
    if not uri or not isinstance(uri, str):
        raise ValueError(f"expected a local path or a URI such as s3://bucket/prefix, got {uri!r}")
    fs, root = fsspec.core.url_to_fs(uri, **storage_options(uri, s3))
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol == "file":
        root = os.path.abspath(root)
    return Location(fs, root.rstrip("/"), protocol, s3.retry_deadline_s if s3 is not None else 0.0)
