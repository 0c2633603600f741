"""The last operator of the stream: writes each ok row's image, returns the rows' manifest records as an Arrow
table (no pixels, no per-run facts: the driver adds those once per manifest part)."""

from __future__ import annotations

import datetime as dt
import hashlib
import time

import numpy as np
import pyarrow as pa

from ifbatch.configs.schema import STAGES, CascadeConfig

from ..inputs.params import param_fields
from ..outputs.images import encode_image, image_relpath
from ..outputs.manifest import RECORD_SCHEMA
from ..storage import locate
from .stages import cell

# Copied from the row as they are: what the row was, and what shaped its image
COPIED = [
    "id",
    "row",
    "prompt_id",
    "image_index",
    "prompt",
    "negative_prompt",
    "seed",
    "truncated",
    "negative_truncated",
    *[f.name for f in param_fields()],
    *[f"seconds_{stage}" for stage in STAGES],
]


def _flags(x: np.ndarray) -> pa.Array:
    """The stages' int8 flags (-1: not checked) as nullable booleans."""
    x = np.asarray(x, dtype=np.int8)
    return pa.array(x > 0, mask=x < 0)


def _placement(batch: dict[str, np.ndarray], n: int) -> list[str]:
    """Each stage's own JSON fragment, joined into one object per row without parsing any of them."""
    cols = [(stage, batch[f"placement_{stage}"]) for stage in STAGES if f"placement_{stage}" in batch]
    return ["{" + ", ".join(f'"{stage}": {col[i]}' for stage, col in cols) + "}" for i in range(n)]


def provenance(batch: dict[str, np.ndarray], i: int, models: dict) -> dict:
    """How row i's image was made, as stored in the file itself (outputs/images.py) and read back by anyone."""
    return {
        "id": str(batch["id"][i]),
        "prompt_id": str(batch["prompt_id"][i]),
        "image_index": int(batch["image_index"][i]),
        "prompt": str(batch["prompt"][i]),
        "negative_prompt": str(batch["negative_prompt"][i] or ""),
        "seed": int(batch["seed"][i]),
        "params": {f.name: cell(batch[f.name][i]) for f in param_fields()},
        "models": models,
    }


class ImageWriter:
    """map_batches callable: one image file per ok row, durable before its record is returned."""

    def __init__(self, cfg: CascadeConfig, output: str, models: dict | None = None):
        self.out = cfg.output
        self.loc = locate(output, cfg.s3)
        self.models = models or {}

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["id"])
        errors = batch.get("error", np.array([""] * n, dtype=object))
        status, error = ["ok"] * n, [None] * n
        uri, width, height, sha, size, seconds = [None] * n, [None] * n, [None] * n, [None] * n, [None] * n, [0.0] * n
        for i in range(n):
            t0 = time.perf_counter()
            if errors[i]:
                status[i], error[i] = "failed", str(errors[i])
                continue
            try:
                pixels = batch["image"][i]
                data = encode_image(pixels, self.out, provenance(batch, i, self.models))
                path = self.loc.path(image_relpath(str(batch["id"][i]), self.out))
                self.loc.write_bytes(path, data)
                uri[i], sha[i], size[i] = self.loc.uri(path), hashlib.sha256(data).hexdigest(), len(data)
                height[i], width[i] = int(pixels.shape[0]), int(pixels.shape[1])
            except Exception as e:
                status[i], error[i] = "failed", f"write: {type(e).__name__}: {e}"[:2000]
            seconds[i] = time.perf_counter() - t0
        written = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")  # orders records: manifest.py
        columns = {c: pa.array(batch[c], RECORD_SCHEMA.field(c).type, from_pandas=True) for c in COPIED}  # NaN: null
        columns |= dict(
            status=status,
            error=error,
            image_uri=uri,
            width=width,
            height=height,
            sha256=sha,
            bytes=pa.array(size, pa.int64()),
            nsfw=_flags(batch["nsfw"]),
            watermark_detected=_flags(batch["watermark_detected"]),
            watermarked=batch["watermarked"].astype(bool),
            seconds_write=seconds,
            placement=_placement(batch, n),
            written_at=[written] * n,
        )
        return pa.table({c: columns[c] for c in RECORD_SCHEMA.names}, schema=RECORD_SCHEMA)
