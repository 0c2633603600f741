"""Stage II: IF-II upscales 64 px to 256 px images in [-1, 1], conditioned on the same T5 embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .params import StageParams
from .runner import NO_TEXT_OR_SAFETY, DiffusionStage
from .seeding import generators
from .tensors import to_numpy, to_torch


class Stage2(DiffusionStage):
    name = "stage_2"
    pipeline = "IFSuperResolutionPipeline"
    load_kwargs = NO_TEXT_OR_SAFETY

    def __call__(
        self,
        images: np.ndarray,
        prompt_embeds: np.ndarray,
        negative_embeds: np.ndarray,
        seeds: Sequence[int],
        params: StageParams | None = None,
    ) -> np.ndarray:
        """(B, 3, s, s) images in [-1, 1] -> (B, 3, size, size) images in [-1, 1]."""
        p = self.params(params)
        out = self.pipe(
            image=to_torch(images, self.device, self.dtype),
            prompt_embeds=to_torch(prompt_embeds, self.device, self.dtype),
            negative_prompt_embeds=to_torch(negative_embeds, self.device, self.dtype),
            guidance_scale=p.guidance_scale,
            noise_level=p.noise_level,
            generator=generators(seeds, self.name),
            output_type="pt",
            **p.schedule_kwargs(),
        ).images
        return to_numpy(out.clamp(-1, 1))
