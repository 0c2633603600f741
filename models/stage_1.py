"""Stage I: IF-I turns T5 embeddings into 64 px images in [-1, 1], one generator per row."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ifbatch.configs.schema import Stage1Config

from .loading import Resolved, load, resolve, resolve_device, torch_dtype
from .seeding import generators
from .tensors import to_numpy, to_torch
from .timesteps import steps_kwargs

NO_TEXT_OR_SAFETY = dict(text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None,
                         watermarker=None, requires_safety_checker=False)


class Stage1:
    name = "stage_1"

    def __init__(self, cfg: Stage1Config, device: str = "auto", pipe=None):
        """Load from cfg.source, or wrap an already built `pipe` (benchmarks of random-weight models)."""
        from diffusers import IFPipeline

        self.cfg = cfg
        self.device = resolve_device(device)
        self.resolved: Resolved | None = None
        if pipe is None:
            self.resolved = resolve(self.name, cfg.source, cfg.revision, cfg.variant, cfg.dtype)
            pipe = load(self.resolved, IFPipeline.from_pretrained, self.device, variant=cfg.variant,
                        **NO_TEXT_OR_SAFETY)
        self.pipe = pipe
        self.pipe.set_progress_bar_config(disable=True)
        self.dtype = torch_dtype(cfg.dtype)

    @property
    def size(self) -> int:
        return int(self.pipe.unet.config.sample_size)

    def __call__(self, prompt_embeds: np.ndarray, negative_embeds: np.ndarray, seeds: Sequence[int],
                 guidance_scale: float | None = None, steps: int | None = None) -> np.ndarray:
        """(B, L, D) embeddings -> (B, 3, size, size) images in [-1, 1]."""
        steps_kw = steps_kwargs(steps, None) if steps else steps_kwargs(self.cfg.steps, self.cfg.timesteps)
        out = self.pipe(
            prompt_embeds=to_torch(prompt_embeds, self.device, self.dtype),
            negative_prompt_embeds=to_torch(negative_embeds, self.device, self.dtype),
            guidance_scale=self.cfg.guidance_scale if guidance_scale is None else guidance_scale,
            generator=generators(seeds, self.name), output_type="pt", **steps_kw,
        ).images
        return to_numpy(out.clamp(-1, 1))
