"""Image files: where each row's image goes (hashed folders) and how its pixels are encoded."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ifbatch.configs.schema import OutputConfig

from ..storage import Location
from .manifest import id_hash

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
IMAGES_DIR = "images"  # under the output root
KEY = "ifbatch"  # the PNG text chunk with the provenance JSON
SOFTWARE = "ifbatch"
EXIF_DESCRIPTION, EXIF_SOFTWARE = 0x010E, 0x0131


def image_relpath(row_id: str, out: OutputConfig) -> str:
    """images/ab/cd/<id>.png: hashed shards keep every folder small, also with millions of rows."""
    h = id_hash(row_id)
    shards = [h[2 * i : 2 * i + 2] for i in range(out.shard_depth)]
    return "/".join([IMAGES_DIR, *shards, f"{row_id}.{EXTENSIONS[out.image_format]}"])


def image_path(loc: Location, uri: str) -> str:
    """Where a recorded image file is in this output: its path below images/, under this output's root (an output
    copied or moved elsewhere, another bucket or folder, is read where it is now)."""
    marker = f"/{IMAGES_DIR}/"
    if marker not in uri:
        return uri.split("://", 1)[1] if "://" in uri else uri
    return loc.path(IMAGES_DIR, uri.rsplit(marker, 1)[1])


def encode_image(pixels: np.ndarray, out: OutputConfig, meta: dict | None = None) -> bytes:
    """The file's bytes, carrying `meta` (how the image was made): PNG in text chunks (the JSON in `ifbatch`, the
    prompt also as the standard `Description`), JPEG and WebP in EXIF (the JSON as ImageDescription, ASCII-escaped
    so that any prompt survives EXIF's ASCII)."""
    buf = io.BytesIO()
    kwargs: dict = {"optimize": False} if out.image_format == "png" else {"quality": out.quality}
    if meta is not None:
        doc = json.dumps(meta, sort_keys=True)
        if out.image_format == "png":
            info = PngInfo()
            info.add_itxt("Description", str(meta.get("prompt", "")))
            info.add_text("Software", SOFTWARE)
            info.add_itxt(KEY, doc)
            kwargs["pnginfo"] = info
        else:
            kwargs["exif"] = _exif(meta, JPEG_EXIF_MAX if out.image_format == "jpeg" else None)
    Image.fromarray(pixels).save(buf, format=out.image_format.upper(), **kwargs)
    return buf.getvalue()


JPEG_EXIF_MAX = 65_000  # a JPEG's EXIF is one APP1 segment: at most 65,533 bytes
PROMPT_KEYS = ("prompt", "negative_prompt")


def _exif(meta: dict, limit: int | None) -> bytes:
    """EXIF bytes carrying `meta`. A JPEG holds at most ~64 KB of it; a long non-Latin prompt escaped to ASCII
    (10,000 emoji: 120 KB) does not fit, so this copy of the prompts is cut (`exif_prompts_cut`: true) until it
    does; the whole record stays in the manifest (and a shard's .json)."""
    for keep in (None, 8000, 4000, 2000, 1000, 250, 0):
        doc = meta
        if keep is not None:
            doc = {**meta, **{k: (meta.get(k) or "")[:keep] for k in PROMPT_KEYS}, "exif_prompts_cut": True}
        exif = Image.Exif()
        exif[EXIF_DESCRIPTION] = json.dumps(doc, sort_keys=True, ensure_ascii=True)
        exif[EXIF_SOFTWARE] = SOFTWARE
        data = exif.tobytes()
        if limit is None or len(data) <= limit:
            return data
    raise ValueError(f"the image's provenance needs {len(data)} bytes of EXIF, more than a JPEG holds ({limit})")


def read_provenance(data: bytes) -> dict | None:
    """What encode_image stored in an image file; None when the file carries none."""
    with Image.open(io.BytesIO(data)) as im:
        doc = im.text.get(KEY) if im.format == "PNG" else im.getexif().get(EXIF_DESCRIPTION)
    try:
        return json.loads(doc) if doc else None
    except ValueError:
        return None
