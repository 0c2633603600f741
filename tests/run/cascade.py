"""The cascade's models chained in one process, runner by runner, with what each stage made: for the model tests
(shapes, determinism, batch independence, loading). Runs go through the stream's steps (tasks/stream/stages.py)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ifbatch.configs.schema import CascadeConfig
from ifbatch.models.cascade import RUNNERS, loaded, prepare
from ifbatch.models.safety import Safety


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


class Cascade:
    def __init__(self, cfg: CascadeConfig):
        prepare(cfg)
        self.cfg = cfg
        self.runners = {name: RUNNERS[name](getattr(cfg, name), cfg.device) for name in loaded(cfg)}
        self.encoder, self.stage_1, self.stage_2, self.stage_3 = (
            self.runners[s] for s in ("text_encoder", "stage_1", "stage_2", "stage_3")
        )
        self.safety = Safety(cfg.safety, cfg.safety_source, cfg.stage_3.dtype, cfg.device)

    def models(self) -> dict[str, dict]:
        rec = {name: r.resolved.record() for name, r in self.runners.items()}
        if self.safety.resolved is not None:
            rec["safety"] = self.safety.resolved.record()
        return rec

    def __call__(
        self, prompts: Sequence[str], seeds: Sequence[int], negative_prompts: Sequence[str | None] | None = None
    ) -> CascadeOutput:
        negatives = list(negative_prompts or [""] * len(prompts))
        t = {}
        t0 = time.perf_counter()
        enc = self.encoder.encode(prompts, negatives)
        t["text_encoder"] = time.perf_counter() - t0
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
        return CascadeOutput(
            safe.images, x1, x2, enc.truncated, safe.nsfw, safe.watermark_detected, safe.watermarked, t
        )
