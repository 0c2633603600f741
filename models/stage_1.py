"""Stage I: IF-I turns T5 embeddings into 64 px images in [-1, 1], one generator per row."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .params import StageParams
from .runner import NO_TEXT_OR_SAFETY, DiffusionStage
from .seeding import generators
from .tensors import to_numpy, to_torch


class Stage1(DiffusionStage):
    name = "stage_1"
    pipeline = "IFPipeline"
    load_kwargs = NO_TEXT_OR_SAFETY

    def __call__(
        self,
        prompt_embeds: np.ndarray,
        negative_embeds: np.ndarray,
        seeds: Sequence[int],
        params: StageParams | None = None,
    ) -> np.ndarray:
        """(B, L, D) embeddings -> (B, 3, size, size) images in [-1, 1]."""
        p = self.params(params)
        out = self.pipe(
            prompt_embeds=to_torch(prompt_embeds, self.device, self.dtype),
            negative_prompt_embeds=to_torch(negative_embeds, self.device, self.dtype),
            guidance_scale=p.guidance_scale,
            generator=generators(seeds, self.name),
            output_type="pt",
            **p.schedule_kwargs(),
        ).images
        return to_numpy(out.clamp(-1, 1))
