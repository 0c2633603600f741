"""One code path for ./out, file:// and s3:// URIs (fsspec; s3fs for S3). Credentials come from the environment."""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec

from ifbatch.configs.schema import S3Config


def storage_errors() -> tuple[type[BaseException], ...]:
    """What an unreachable or refusing store raises: OSError (local, and S3 errors s3fs translates) and botocore's
    own connection errors, which s3fs lets through."""
    from botocore.exceptions import BotoCoreError

    return (OSError, BotoCoreError)


@dataclass(frozen=True)
class Location:
    """A filesystem plus a root path on it; `uri()` gives back full URIs for the manifest."""

    fs: Any
    root: str
    protocol: str

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def uri(self, path: str) -> str:
        return path if self.protocol == "file" else f"{self.protocol}://{path}"

    def write_bytes(self, path: str, data: bytes) -> None:
        """Durable once it returns: an S3 PUT is atomic; a local file is written aside, synced, then renamed."""
        if self.protocol != "file":
            self.fs.pipe_file(path, data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def storage_options(uri: str, s3: S3Config | None) -> dict[str, Any]:
    if not uri.startswith("s3://") or s3 is None:
        return {}
    client = {k: v for k, v in {"endpoint_url": s3.endpoint_url, "region_name": s3.region}.items() if v}
    return {"client_kwargs": client} if client else {}


def locate(uri: str, s3: S3Config | None = None) -> Location:
    """Resolve a local path or URI into a Location (the root is not created)."""
    if not uri or not isinstance(uri, str):
        raise ValueError(f"expected a local path or a URI such as s3://bucket/prefix, got {uri!r}")
    fs, root = fsspec.core.url_to_fs(uri, **storage_options(uri, s3))
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol == "file":
        root = os.path.abspath(root)
    return Location(fs, root.rstrip("/"), protocol)
