"""Preflight: before Ray starts or a model loads, prove that the prompt table can be read (its columns and every
part's types; rows are checked when the table is read) and that the output can be written (a probe object written,
read back and deleted). A failure names the URI, the store's own error code, and what to check."""

from __future__ import annotations

import os
import secrets
from dataclasses import replace

from ifbatch.configs.schema import CascadeConfig

from .inputs.prompts import PromptTableError, open_table
from .storage import locate, storage_errors, store_code

PROBE = ".ifbatch-probe"
PROBE_RETRY_S = 10.0  # a store that does not answer the probe within this is reported at once, not after minutes


class OutputError(OSError):
    """The output cannot be used: the message names the URI, the store's code and a hint."""


def preflight(prompts: str, output: str, cfg: CascadeConfig) -> None:
    """Raise PromptTableError or OutputError when the run could not succeed."""
    inside(prompts, output, cfg)
    try:
        open_table(prompts, cfg)
    except storage_errors() as e:
        raise PromptTableError(f"cannot read prompt table {prompts!r}: {describe(e, prompts, cfg)}") from None
    check_output(output, cfg)


def inside(prompts: str, output: str, cfg: CascadeConfig) -> None:
    """An output inside the prompts folder would be read as prompts by every later run (its images as Parquet)."""
    p, o = locate(prompts, cfg.s3), locate(output, cfg.s3)
    if p.protocol == o.protocol and (o.root.rstrip("/") + "/").startswith(p.root.rstrip("/") + "/"):
        raise OutputError(
            f"output {output!r} is inside the prompts folder {prompts!r}: later runs would read its files as "
            f"prompts; write it elsewhere"
        )


def check_output(output: str, cfg: CascadeConfig) -> None:
    """Write, read back and delete a probe object under the output (created if missing)."""
    try:
        loc = replace(locate(output, cfg.s3), retry_s=min(cfg.s3.retry_deadline_s, PROBE_RETRY_S))
        if loc.protocol == "file" and os.path.exists(loc.root) and not os.path.isdir(loc.root):
            raise OutputError(f"output {output!r} is a file; expected a folder (or a path that does not exist yet)")
        path = loc.path(f"{PROBE}-{secrets.token_hex(4)}")
        data = b"ifbatch can write here"
        loc.write_bytes(path, data)
        try:
            back = loc.fs.cat_file(path)
        finally:
            loc.fs.rm_file(path)
    except OutputError:
        raise
    except (*storage_errors(), ValueError) as e:
        raise OutputError(f"cannot write to output {output!r}: {describe(e, output, cfg)}") from None
    if back != data:
        raise OutputError(f"output {output!r}: a probe object read back different bytes than were written")


CREDENTIALS = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "403", "ExpiredToken"}
NO_BUCKET = {"NoSuchBucket", "404"}


def describe(e: BaseException, uri: str, cfg: CascadeConfig) -> str:
    """`<code>: <message>; <hint>` for a storage error on `uri`."""
    code = store_code(e)
    text = f"{code or type(e).__name__}: {e}"
    if not uri.startswith("s3://"):
        return text
    bucket = uri[len("s3://") :].split("/", 1)[0]
    endpoint = cfg.s3.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    if code in CREDENTIALS or isinstance(e, PermissionError):
        hint = (
            f"check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and that they may "
            f"read and write bucket {bucket!r} at {endpoint}"
        )
    elif code in NO_BUCKET or isinstance(e, FileNotFoundError):
        hint = f"bucket {bucket!r} does not exist at {endpoint}: create it, or check the bucket name"
    else:
        hint = f"check the endpoint ({endpoint}; s3.endpoint_url or AWS_ENDPOINT_URL) and that it is reachable"
    return f"{text}; {hint}"
