"""Stage I: IF-I turns T5 embeddings into 64 px images in [-1, 1], one generator per row."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .params import StageParams
from .runner import NO_TEXT_OR_SAFETY, DiffusionStage
from .tensors import to_numpy


class Stage1(DiffusionStage):
    name = "stage_1"
    pipeline = "IFPipeline"
    load_kwargs = NO_TEXT_OR_SAFETY

    def __call__(
        self, prompt_embeds: np.ndarray, negative_embeds: np.ndarray, seeds: Sequence[int],
        params: StageParams | None = None,
    ) -> np.ndarray:  # fmt: skip
        """(B, L, D) embeddings -> (B, 3, size, size) images in [-1, 1]."""
        n = len(seeds)
        prompt_embeds, negative_embeds, seeds = self.pad(n, prompt_embeds, negative_embeds, list(seeds))
        out = self.pipe(
            prompt_embeds=self.tensor(prompt_embeds), negative_prompt_embeds=self.tensor(negative_embeds),
            output_type="pt", **self.call_kwargs(seeds, params),
        ).images  # fmt: skip
        return to_numpy(out.clamp(-1, 1))[:n]

    def example(self, text_length: int) -> tuple:
        """Inputs of this stage's batch shape (for warm_up)."""
        e = np.zeros((self.cfg.batch_size, text_length, self.pipe.unet.config.encoder_hid_dim), np.float16)
        return e, e, list(range(self.cfg.batch_size))
