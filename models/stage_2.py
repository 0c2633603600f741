"""Stage II: IF-II upscales 64 px to 256 px images in [-1, 1], conditioned on the same T5 embeddings."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ifbatch.configs.schema import Stage2Config

from .loading import Resolved, load, resolve, resolve_device, torch_dtype
from .seeding import generators
from .stage_1 import NO_TEXT_OR_SAFETY
from .tensors import to_numpy, to_torch
from .timesteps import steps_kwargs


class Stage2:
    name = "stage_2"

    def __init__(self, cfg: Stage2Config, device: str = "auto", pipe=None):
        """Load from cfg.source, or wrap an already built `pipe` (benchmarks of random-weight models)."""
        from diffusers import IFSuperResolutionPipeline

        self.cfg = cfg
        self.device = resolve_device(device)
        self.resolved: Resolved | None = None
        if pipe is None:
            self.resolved = resolve(self.name, cfg.source, cfg.revision, cfg.variant, cfg.dtype)
            pipe = load(self.resolved, IFSuperResolutionPipeline.from_pretrained, self.device, variant=cfg.variant,
                        **NO_TEXT_OR_SAFETY)
        self.pipe = pipe
        self.pipe.set_progress_bar_config(disable=True)
        self.dtype = torch_dtype(cfg.dtype)

    @property
    def size(self) -> int:
        return int(self.pipe.unet.config.sample_size)

    def __call__(self, images: np.ndarray, prompt_embeds: np.ndarray, negative_embeds: np.ndarray,
                 seeds: Sequence[int], guidance_scale: float | None = None, steps: int | None = None) -> np.ndarray:
        """(B, 3, s, s) images in [-1, 1] -> (B, 3, size, size) images in [-1, 1]."""
        steps_kw = steps_kwargs(steps, None) if steps else steps_kwargs(self.cfg.steps, self.cfg.timesteps)
        out = self.pipe(
            image=to_torch(images, self.device, self.dtype),
            prompt_embeds=to_torch(prompt_embeds, self.device, self.dtype),
            negative_prompt_embeds=to_torch(negative_embeds, self.device, self.dtype),
            guidance_scale=self.cfg.guidance_scale if guidance_scale is None else guidance_scale,
            noise_level=self.cfg.noise_level, generator=generators(seeds, self.name), output_type="pt", **steps_kw,
        ).images
        return to_numpy(out.clamp(-1, 1))
