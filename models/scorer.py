"""CLIP image-text similarity: how well an image matches its prompt, 100 x the cosine of CLIP's image and text
embeddings (the CLIPScore scale). transformers' CLIPModel and CLIPProcessor, from a hub id or a local directory
through models.loading, exactly like the cascade's models; `models.tiny.build_tiny_clip` makes a seeded
random-weight one for tests. The scorer stage (best of k, the score filter) and stage III (every final image's
clip_score) both run it."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .loading import Resolved, load, resolve, resolve_device


class ClipScorer:
    name = "scorer"

    def __init__(self, cfg: Any, device: str = "auto"):
        """cfg: the config's `scorer` section (source, revision, dtype, batch_size)."""
        from transformers import CLIPModel, CLIPProcessor

        self.cfg = cfg
        self.resolved = self.resolve(cfg)
        self.device = resolve_device(device)
        self.processor = load(self.resolved, CLIPProcessor.from_pretrained, None, dtype_kw=None)
        self.model = load(self.resolved, CLIPModel.from_pretrained, self.device).eval()
        self.record = self.resolved.record()

    @classmethod
    def resolve(cls, cfg: Any) -> Resolved:
        """Check the source before any weights load (and pin a hub commit)."""
        return resolve(cls.name, cfg.source, cfg.revision, cfg.variant, cfg.dtype, probe_file="config.json")

    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """images: (n, h, w, 3) uint8, any size (the processor resizes); prompts: n texts. The n scores, float32,
        computed `cfg.batch_size` images at a time (each image's score is its own: the batch does not change it)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts: one prompt per image expected")
        size = self.cfg.batch_size
        parts = [self._scores(images[i : i + size], list(prompts[i : i + size])) for i in range(0, len(images), size)]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    @torch.no_grad()
    def _scores(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        inputs = self.processor(text=prompts, images=list(images), return_tensors="pt", padding=True, truncation=True)
        dtype = next(self.model.parameters()).dtype
        image = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device, dtype))
        text = self.model.get_text_features(
            input_ids=inputs["input_ids"].to(self.device), attention_mask=inputs["attention_mask"].to(self.device)
        )
        image, text = (_tensor(x).float() for x in (image, text))
        cos = torch.nn.functional.cosine_similarity(image, text, dim=-1)
        return (100.0 * cos).cpu().numpy().astype(np.float32)


def to_pixels(images: np.ndarray) -> np.ndarray:
    """Stage I/II images, (n, 3, s, s) floats in [-1, 1], as (n, s, s, 3) uint8 (what the final images are)."""
    x = (np.asarray(images, dtype=np.float32).transpose(0, 2, 3, 1) + 1.0) * 127.5
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _tensor(out) -> torch.Tensor:
    """The embeddings: a tensor, or the pooled output of a model output object (transformers versions differ)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output
