"""Image files: where each row's image goes (hashed folders) and how its pixels are encoded."""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

from ifbatch.configs.schema import OutputConfig

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def image_relpath(row_id: str, out: OutputConfig) -> str:
    """images/ab/cd/<id>.png: hashed shards keep every folder small, also with millions of rows."""
    h = hashlib.blake2b(row_id.encode(), digest_size=8).hexdigest()
    shards = [h[2 * i : 2 * i + 2] for i in range(out.shard_depth)]
    return "/".join(["images", *shards, f"{row_id}.{EXTENSIONS[out.image_format]}"])


def encode_image(pixels: np.ndarray, out: OutputConfig) -> bytes:
    buf = io.BytesIO()
    kwargs = {"optimize": False} if out.image_format == "png" else {"quality": out.quality}
    Image.fromarray(pixels).save(buf, format=out.image_format.upper(), **kwargs)
    return buf.getvalue()
