"""Whole images no manifest record names, and the records they would have had.

A writer makes an image durable before its record, so a run killed between the two (SIGKILL, the OOM killer, a lost
node) leaves whole images without records. Each carries its provenance (outputs/writer.py `provenance`: every fact
of its record that is not of the file), so its record can be made again from the image alone. The formats find them
(formats.py `unrecorded`); adopt.py decides which a run takes over, verify.py lists them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
from dataclasses import dataclass

from PIL import Image

from ..inputs.params import param_fields
from .credentials import signer_of
from .manifest import RECORD_SCHEMA

# What a record needs from an image's provenance (ifbatch before 2026-12 stored less: its images are not taken over)
NEEDED = (
    "id", "row", "prompt_id", "image_index", "prompt", "negative_prompt", "seed", "text_preprocessing",
    "params", "models", "truncated", "negative_truncated", "nsfw", "watermark_detected", "watermarked", "clip_score",
    "candidates_per_image",
)  # fmt: skip
COPIED = [n for n in NEEDED if n not in ("params", "models")]


@dataclass
class Unit:
    """A file, or a shard, that no record names: the records of its images when they can be made again from it
    (its whole unit is taken over or none of it), else why not."""

    uri: str
    records: list[dict] | None
    why: str = ""

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.records or []]


def record_of(meta: dict | None, data: bytes, **where) -> dict | str:
    """The manifest record (RECORD_SCHEMA, plus the part's `models`) of an image from its bytes and the provenance
    it carries; `where`: its format, and image_uri, or shard, member and offset. A string says why it cannot be.
    (Its run's times, placement and score floor are not in the image: null. Its `run_id` is the run that records
    it.)"""
    if not isinstance(meta, dict):
        return "it carries no ifbatch provenance"
    missing = [k for k in NEEDED if k not in meta]
    if missing:
        return f"its provenance lacks {', '.join(missing)} (written by an older ifbatch)"
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            im.verify()  # every chunk's checksum (PNG) or the stream's structure: a whole image
    except Exception as e:
        return f"it does not decode: {type(e).__name__}: {e}"
    rec: dict = {name: None for name in RECORD_SCHEMA.names}
    rec |= {k: meta[k] for k in COPIED}
    params = meta["params"] if isinstance(meta["params"], dict) else {}
    rec |= {f.name: params.get(f.name) for f in param_fields()}
    rec |= dict(
        candidate=meta.get("candidate", 0),
        candidate_seed=meta.get("candidate_seed", meta["seed"]),
        candidate_scores=meta.get("candidate_scores"),
        status="ok",
        width=width,
        height=height,
        sha256=hashlib.sha256(data).hexdigest(),
        bytes=len(data),
        c2pa_signer=signer_of(data),  # its content credentials, when it has whole ones
        written_at=dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"),  # taken over now: its latest record
        models=json.dumps(meta["models"], sort_keys=True),
        **where,
    )
    return rec
