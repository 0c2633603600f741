"""Write final images (sharded folders, one file per row) and turn each row into its manifest record."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import time

import numpy as np
from PIL import Image

from ifbatch.configs.schema import CascadeConfig

from .stages import cell
from .storage import locate

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def image_relpath(row_id: str, cfg: CascadeConfig) -> str:
    """images/ab/cd/<id>.png: hashed shards keep every folder small, also with millions of rows."""
    h = hashlib.blake2b(row_id.encode(), digest_size=8).hexdigest()
    shards = [h[2 * i: 2 * i + 2] for i in range(cfg.output.shard_depth)]
    return "/".join(["images", *shards, f"{row_id}.{EXTENSIONS[cfg.output.image_format]}"])


def encode_image(pixels: np.ndarray, cfg: CascadeConfig) -> bytes:
    buf = io.BytesIO()
    fmt = cfg.output.image_format
    kwargs = {"optimize": False} if fmt == "png" else {"quality": cfg.output.quality}
    Image.fromarray(pixels).save(buf, format=fmt.upper(), **kwargs)
    return buf.getvalue()


def _flag(x) -> bool | None:
    return None if x is None or int(x) < 0 else bool(x)


def stage_params(cfg: CascadeConfig, row: dict) -> dict:
    """The parameters that really shaped this row: config values unless the row overrode them."""
    out = {}
    for stage in ("stage_1", "stage_2", "stage_3"):
        sc = getattr(cfg, stage)
        steps = row.get(f"{stage}_steps")
        guidance = row.get(f"{stage}_guidance_scale")
        timesteps = None if steps is not None else getattr(sc, "timesteps", None)
        if timesteps:
            from ifbatch.models.timesteps import schedule
            steps = len(schedule(timesteps))
        out[f"{stage}_steps"] = int(steps if steps is not None else sc.steps)
        if stage != "stage_3":
            out[f"{stage}_timesteps"] = timesteps
        out[f"{stage}_guidance_scale"] = float(guidance if guidance is not None else sc.guidance_scale)
        if stage != "stage_1":
            out[f"{stage}_noise_level"] = int(sc.noise_level)
    return out


class ImageWriter:
    """map_batches callable: writes each ok row's image, returns manifest records (no pixels)."""

    def __init__(self, cfg: CascadeConfig, output: str, run_id: str, models: str):
        self.cfg, self.run_id, self.models = cfg, run_id, models
        self.loc = locate(output, cfg.s3)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:

        records = []
        for i in range(len(batch["id"])):
            row = {k: cell(v[i]) for k, v in batch.items() if k != "image" and np.ndim(v[i]) == 0}
            rec = {"id": row["id"], "row": int(row["row"]), "prompt": row["prompt"],
                   "negative_prompt": row["negative_prompt"], "seed": int(row["seed"]),
                   "status": "ok", "error": None, "image_uri": None, "width": None, "height": None, "sha256": None,
                   "nsfw": _flag(row.get("nsfw")), "watermark_detected": _flag(row.get("watermark_detected")),
                   "watermarked": bool(row.get("watermarked") or False),
                   "truncated": bool(row.get("truncated") or False),
                   "negative_truncated": bool(row.get("negative_truncated") or False),
                   **stage_params(self.cfg, row),
                   **{f"seconds_{s}": row.get(f"seconds_{s}") for s in ("encode", "stage_1", "stage_2", "stage_3")},
                   "models": self.models, "placement": row.get("placement"), "run_id": self.run_id}
            t0 = time.perf_counter()
            if row.get("error"):
                rec.update(status="failed", error=row["error"])
            else:
                try:
                    pixels = batch["image"][i]
                    data = encode_image(pixels, self.cfg)
                    path = self.loc.path(image_relpath(row["id"], self.cfg))
                    self.loc.write_bytes(path, data)
                    rec.update(image_uri=self.loc.uri(path), height=int(pixels.shape[0]), width=int(pixels.shape[1]),
                               sha256=hashlib.sha256(data).hexdigest())
                except Exception as e:
                    rec.update(status="failed", error=f"write: {type(e).__name__}: {e}"[:2000])
            rec["seconds_write"] = time.perf_counter() - t0
            rec["written_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            records.append(rec)
        return {"record": np.array([json.dumps(r) for r in records], dtype=object)}
