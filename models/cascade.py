"""The whole cascade in one process: load every stage from a config and run rows end to end.

The Ray pipeline (tasks/) runs the same stage classes, one per actor; this in-process form serves tests,
the GPU smoke benchmark and quick experiments.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ifbatch.configs.schema import CascadeConfig

from .encode import TextEncoder
from .safety import Safety
from .stage_1 import Stage1
from .stage_2 import Stage2
from .stage_3 import Stage3
from .tiny import ensure_tiny_cascade


@dataclass
class CascadeOutput:
    images: np.ndarray  # (B, H, W, 3) uint8
    stage_1: np.ndarray
    stage_2: np.ndarray
    truncated: list[bool]
    nsfw: list[bool | None]
    watermark_detected: list[bool | None]
    watermarked: list[bool]
    seconds: dict[str, float] = field(default_factory=dict)


def prepare(cfg: CascadeConfig) -> None:
    """Make sure generated weights exist before anything loads them."""
    if cfg.tiny is not None:
        ensure_tiny_cascade(cfg.tiny.dir, cfg.tiny.seed)


class Cascade:
    def __init__(self, cfg: CascadeConfig):
        prepare(cfg)
        self.cfg = cfg
        self.encoder = TextEncoder(cfg.text_encoder, cfg.device)
        self.stage_1 = Stage1(cfg.stage_1, cfg.device)
        self.stage_2 = Stage2(cfg.stage_2, cfg.device)
        self.stage_3 = Stage3(cfg.stage_3, cfg.device)
        self.safety = Safety(cfg.safety, cfg.safety_source, cfg.stage_3.dtype, cfg.device)

    def models(self) -> dict[str, dict]:
        parts = [self.encoder, self.stage_1, self.stage_2, self.stage_3]
        rec = {p.resolved.role: p.resolved.record() for p in parts}
        if self.safety.resolved is not None:
            rec["safety"] = self.safety.resolved.record()
        return rec

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int],
                 negative_prompts: Sequence[str | None] | None = None) -> CascadeOutput:
        negatives = list(negative_prompts or [""] * len(prompts))
        t = {}
        t0 = time.perf_counter()
        enc = self.encoder.encode(prompts, negatives)
        t["encode"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        x1 = self.stage_1(enc.prompt_embeds, enc.negative_embeds, seeds)
        t["stage_1"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        x2 = self.stage_2(x1, enc.prompt_embeds, enc.negative_embeds, seeds)
        t["stage_2"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        x3 = self.stage_3(x2, prompts, negatives, seeds)
        safe = self.safety(x3)
        t["stage_3"] = time.perf_counter() - t0
        return CascadeOutput(safe.images, x1, x2, enc.truncated, safe.nsfw, safe.watermark_detected,
                             safe.watermarked, t)
