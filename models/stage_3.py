"""Stage III: the Stable Diffusion x4 upscaler turns 256 px images and the prompt TEXT into 1024 px uint8 images."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ifbatch.configs.schema import Stage3Config

from .loading import Resolved, load, resolve, resolve_device, torch_dtype
from .seeding import generators
from .tensors import to_torch


class Stage3:
    name = "stage_3"

    def __init__(self, cfg: Stage3Config, device: str = "auto", pipe=None):
        """Load from cfg.source, or wrap an already built `pipe` (benchmarks of random-weight models)."""
        from diffusers import StableDiffusionUpscalePipeline

        self.cfg = cfg
        self.device = resolve_device(device)
        self.resolved: Resolved | None = None
        if pipe is None:
            self.resolved = resolve(self.name, cfg.source, cfg.revision, cfg.variant, cfg.dtype)
            pipe = load(self.resolved, StableDiffusionUpscalePipeline.from_pretrained, self.device,
                        variant=cfg.variant, safety_checker=None, feature_extractor=None, watermarker=None)
        self.pipe = pipe
        self.pipe.set_progress_bar_config(disable=True)
        self.dtype = torch_dtype(cfg.dtype)

    def __call__(self, images: np.ndarray, prompts: Sequence[str], negative_prompts: Sequence[str | None],
                 seeds: Sequence[int], guidance_scale: float | None = None, steps: int | None = None) -> np.ndarray:
        """(B, 3, s, s) images in [-1, 1] + prompt text -> (B, 4s, 4s, 3) uint8 images."""
        x = (to_torch(images, self.device, self.dtype) + 1) / 2  # the upscaler expects [0, 1]
        with torch.no_grad():  # the upscaler's prompt encoding is not under no_grad by itself
            out = self.pipe(
                prompt=list(prompts), negative_prompt=[n or "" for n in negative_prompts], image=x,
                num_inference_steps=steps or self.cfg.steps,
                guidance_scale=self.cfg.guidance_scale if guidance_scale is None else guidance_scale,
                noise_level=self.cfg.noise_level, generator=generators(seeds, self.name), output_type="np",
            ).images
        return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)
