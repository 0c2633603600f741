"""Stage II: IF-II upscales 64 px to 256 px images in [-1, 1], conditioned on the same T5 embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .params import StageParams
from .runner import NO_TEXT_OR_SAFETY, DiffusionStage
from .tensors import to_numpy


class Stage2(DiffusionStage):
    name = "stage_2"
    pipeline = "IFSuperResolutionPipeline"
    load_kwargs = NO_TEXT_OR_SAFETY

    def __call__(
        self, images: np.ndarray, prompt_embeds: np.ndarray, negative_embeds: np.ndarray, seeds: Sequence[int],
        params: StageParams | None = None,
    ) -> np.ndarray:  # fmt: skip
        """(B, 3, s, s) images in [-1, 1] -> (B, 3, size, size) images in [-1, 1]."""
        n = len(seeds)
        images, prompt_embeds, negative_embeds, seeds = self.pad(n, images, prompt_embeds, negative_embeds, list(seeds))
        out = self.pipe(
            image=self.tensor(images), prompt_embeds=self.tensor(prompt_embeds),
            negative_prompt_embeds=self.tensor(negative_embeds), output_type="pt", **self.call_kwargs(seeds, params),
        ).images  # fmt: skip
        return to_numpy(out.clamp(-1, 1))[:n]

    def example(self, text_length: int) -> tuple:
        """Inputs of this stage's batch shape (for warm_up): IF-II upscales 4x."""
        b, s = self.cfg.batch_size, self.size // 4
        e = np.zeros((b, text_length, self.pipe.unet.config.encoder_hid_dim), np.float16)
        return np.zeros((b, 3, s, s), np.float16), e, e, list(range(b))
