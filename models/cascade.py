"""The whole cascade: which runner serves each stage, how all of them are checked before loading, and the
cascade in one process (tests, the GPU smoke benchmark, quick experiments).

The Ray pipeline (tasks/) runs the same runners, one per actor.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ifbatch.configs.schema import CascadeConfig

from .encode import TextEncoder
from .safety import Safety
from .scorer import ClipScorer
from .stage_1 import Stage1
from .stage_2 import Stage2
from .stage_3 import Stage3
from .tiny import ensure_tiny_cascade

# The runner of each stage, in the order of configs.schema.STAGES (tests check they agree).
RUNNERS = {
    "text_encoder": TextEncoder,
    "stage_1": Stage1,
    "scorer": ClipScorer,
    "stage_2": Stage2,
    "stage_3": Stage3,
}


def loaded(cfg: CascadeConfig) -> list[str]:
    """The stages whose models a run loads: every one but a scorer whose source is null (no scores)."""
    return [name for name in RUNNERS if name != "scorer" or cfg.scorer.source is not None]


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


def resolve_cascade(cfg: CascadeConfig) -> tuple[CascadeConfig, dict[str, dict]]:
    """Build generated weights if asked, check every model source, pin hub commits so that every replica loads
    the same revision. Returns the pinned config and what each model is (for the manifest and run record)."""
    prepare(cfg)
    pinned, record = {}, {}
    for name in loaded(cfg):
        section = getattr(cfg, name)
        r = RUNNERS[name].resolve(section)
        record[name] = r.record()
        if r.commit:
            pinned[name] = section.model_copy(update={"revision": r.commit})
    r = Safety.resolve(cfg.safety, cfg.safety_source, cfg.stage_3.dtype)
    if r is not None:
        record["safety"] = r.record()
        if r.commit:
            pinned["safety"] = cfg.safety.model_copy(update={"revision": r.commit})
    return cfg.model_copy(update=pinned), record


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
