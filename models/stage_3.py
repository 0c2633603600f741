"""Stage III: the Stable Diffusion x4 upscaler turns 256 px images and the prompt TEXT into 1024 px uint8 images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .params import StageParams
from .runner import DiffusionStage


class Stage3(DiffusionStage):
    name = "stage_3"
    pipeline = "StableDiffusionUpscalePipeline"
    load_kwargs = dict(safety_checker=None, feature_extractor=None, watermarker=None)

    def __call__(
        self, images: np.ndarray, prompts: Sequence[str], negative_prompts: Sequence[str | None], seeds: Sequence[int],
        params: StageParams | None = None,
    ) -> np.ndarray:  # fmt: skip
        """(B, 3, s, s) images in [-1, 1] + prompt text -> (B, 4s, 4s, 3) uint8 images."""
        n = len(seeds)
        images, prompts, negative_prompts, seeds = self.pad(
            n, images, list(prompts), list(negative_prompts), list(seeds)
        )
        x = (self.tensor(images) + 1) / 2  # the upscaler expects [0, 1]
        with torch.no_grad():  # the upscaler's prompt encoding is not under no_grad by itself
            out = self.pipe(
                prompt=list(prompts), negative_prompt=[n or "" for n in negative_prompts], image=x, output_type="np",
                **self.call_kwargs(seeds, params),
            ).images  # fmt: skip
        return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)[:n]

    def example(self, side: int) -> tuple:
        """Inputs of this stage's batch shape (for warm_up): `side`, the 256 px stage's output."""
        b = self.cfg.batch_size
        return np.zeros((b, 3, side, side), np.float16), [""] * b, [None] * b, list(range(b))
