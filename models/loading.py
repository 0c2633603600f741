"""Load cascade components with `from_pretrained`, from a hub id or a local directory, with clear errors."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError

from .quiet import quiet_libraries, quiet_progress_bars

quiet_libraries()  # before any runner imports diffusers' pipelines (importing them already warns)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
T = TypeVar("T")


class ModelLoadError(RuntimeError):
    """A model that could not be loaded; the message says which, why, and what to do."""


@dataclass(frozen=True)
class Resolved:
    """Where a component really came from, for the manifest."""

    role: str
    source: str
    location: str  # local directory, or hub id
    revision: str | None  # requested revision
    commit: str | None  # resolved hub commit; None for local directories
    variant: str | None
    dtype: str

    def record(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "revision": self.revision,
            "commit": self.commit,
            "variant": self.variant,
            "dtype": self.dtype,
        }


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {sorted(DTYPES)}") from None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but torch sees no CUDA GPU; use device: cpu or auto")
    return torch.device(device)


def _looks_local(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.startswith("file://") or os.path.isdir(source)


def local_dir(source: str) -> Path | None:
    """The directory a source names, or None when it is a hub id."""
    if not _looks_local(source):
        return None
    path = Path(os.path.expanduser(source.removeprefix("file://")))
    return path


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {str(err)[:200]}"


def _hub_advice(role: str, source: str, revision: str | None, err: Exception) -> ModelLoadError:
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = f" at revision {revision!r}" if revision else ""
    fix_local = f"or point {role}.source at a local directory that holds the weights"
    if isinstance(err, GatedRepoError):
        why = "the repository is gated and this machine's Hugging Face token has not been granted access"
        todo = (
            f"log in with `hf auth login` (or set HF_TOKEN), accept the licence at "
            f"https://huggingface.co/{source}, {fix_local}"
        )
    elif isinstance(err, RevisionNotFoundError):
        why = f"the revision {revision!r} does not exist"
        todo = f"set {role}.revision to an existing branch, tag or commit"
    elif isinstance(err, RepositoryNotFoundError):
        why = "the repository does not exist, or is private and no valid token was given"
        todo = f"check the id, log in with `hf auth login`, {fix_local}"
    elif isinstance(err, (OfflineModeIsEnabled, LocalEntryNotFoundError)) or "offline" in str(err).lower():
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            why = "HF_HUB_OFFLINE=1 is set and the model is not in the local Hugging Face cache"
        else:
            why = (
                f"the Hugging Face Hub at {constants.ENDPOINT} cannot be reached and the model is not in the "
                f"local cache ({_root_cause(err)})"
            )
        todo = (
            f"download it where the hub is reachable (`hf download {source}`) and copy the cache (HF_HOME), {fix_local}"
        )
    else:
        why = f"{type(err).__name__}: {_root_cause(err)}"
        todo = f"check the network and HF_ENDPOINT, log in with `hf auth login`, {fix_local}"
    return ModelLoadError(f"cannot load {role} model {source!r}{rev}: {why}. To fix: {todo}.")


def resolve(
    role: str, source: str, revision: str | None, variant: str | None, dtype: str, probe_file: str = "model_index.json"
) -> Resolved:
    """Check a source before any weights load: a local directory must exist; a hub id must answer.

    For hub ids the small `probe_file` is fetched (or found in the cache), which pins the commit that is
    recorded in the manifest and turns hub failures into one clear error.
    """
    path = local_dir(source)
    if path is not None:
        if not path.is_dir():
            raise ModelLoadError(
                f"cannot load {role} model: local directory {str(path)!r} (from {role}.source="
                f"{source!r}) does not exist. To fix: point {role}.source at a directory laid out "
                f"like the hub repo, or at a hub id."
            )
        return Resolved(role, source, str(path.resolve()), revision, None, variant, dtype)
    from huggingface_hub import hf_hub_download

    try:
        cached = hf_hub_download(source, probe_file, revision=revision)
    except Exception as err:  # every hub failure becomes one actionable error
        raise _hub_advice(role, source, revision, err) from err
    parts = Path(cached).parts
    commit = parts[parts.index("snapshots") + 1] if "snapshots" in parts else None
    return Resolved(role, source, source, revision, commit, variant, dtype)


def load(
    resolved: Resolved,
    loader: Callable[..., T],
    device: torch.device | None,
    dtype_kw: str | None = "dtype",
    **kwargs: Any,
) -> T:
    """Call a `from_pretrained` with the resolved location, revision, variant and dtype; move to `device`.

    `dtype_kw` is the loader's name for the dtype argument ("dtype" in diffusers 0.42 and transformers 5;
    None for tokenizers and processors).
    """
    quiet_progress_bars()
    if dtype_kw:
        kwargs[dtype_kw] = torch_dtype(resolved.dtype)
    try:
        obj = loader(resolved.location, revision=resolved.commit or resolved.revision, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:  # (a damaged weights file: transformers lets the last out)
        raise ModelLoadError(f"cannot load {resolved.role} model from {resolved.location!r}: {err}") from err
    return obj.to(device) if device is not None and hasattr(obj, "to") else obj
