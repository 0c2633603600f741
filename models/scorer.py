"""CLIP image-text similarity: how well an image matches its prompt, 100 x the cosine of CLIP's image and text
embeddings (the CLIPScore scale). transformers' CLIPModel and CLIPProcessor, from a hub id or a local directory
through models.loading, exactly like the cascade's models; `models.tiny.build_tiny_clip` makes a seeded
random-weight one for tests. (The best-of-k scorer of issue 22 is built on this; it is not in the stream yet.)"""

from __future__ import annotations

import numpy as np
import torch

from .loading import load, resolve, resolve_device


class ClipScorer:
    def __init__(self, source: str, revision: str | None = None, dtype: str = "float32", device: str = "auto"):
        from transformers import CLIPModel, CLIPProcessor

        resolved = resolve("scorer", source, revision, None, dtype, probe_file="config.json")
        self.device = resolve_device(device)
        self.processor = load(resolved, CLIPProcessor.from_pretrained, None, dtype_kw=None)
        self.model = load(resolved, CLIPModel.from_pretrained, self.device).eval()
        self.record = resolved.record()

    @torch.no_grad()
    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """images: (n, h, w, 3) uint8, any size (the processor resizes); prompts: n texts. The n scores, float32."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts: one prompt per image expected")
        inputs = self.processor(
            text=list(prompts), images=list(images), return_tensors="pt", padding=True, truncation=True
        )
        dtype = next(self.model.parameters()).dtype
        image = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device, dtype))
        text = self.model.get_text_features(
            input_ids=inputs["input_ids"].to(self.device), attention_mask=inputs["attention_mask"].to(self.device)
        )
        image, text = (_tensor(x).float() for x in (image, text))
        cos = torch.nn.functional.cosine_similarity(image, text, dim=-1)
        return (100.0 * cos).cpu().numpy().astype(np.float32)


def _tensor(out) -> torch.Tensor:
    """The embeddings: a tensor, or the pooled output of a model output object (transformers versions differ)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output
