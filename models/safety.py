"""IF's safety checker (NSFW and watermark scores) and IF's watermarker, as per-row flags, never blacked-out images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ifbatch.configs.schema import SafetyConfig

from .loading import Resolved, load, resolve, resolve_device


def checker_class():
    """IF's safety checker, made loadable under transformers 5.

    diffusers 0.42's `IFSafetyChecker.__init__` never calls `post_init()`, which transformers 5's
    `from_pretrained` relies on (it fails with "no attribute 'all_tied_weights_keys'"). Same weights, same names.
    """
    from diffusers.pipelines.deepfloyd_if import IFSafetyChecker

    class SafetyChecker(IFSafetyChecker):
        def __init__(self, config):
            super().__init__(config)
            self.post_init()

    return SafetyChecker


def probe_file(cfg: SafetyConfig) -> str:
    """The small file `resolve` fetches to check the source holds what the enabled switches need."""
    return "safety_checker/config.json" if cfg.checker else "watermarker/config.json"


@dataclass
class SafetyResult:
    images: np.ndarray  # (B, H, W, 3) uint8, watermarked when enabled
    nsfw: list[bool | None]  # None: checker disabled
    watermark_detected: list[bool | None]
    watermarked: list[bool]


class Safety:
    """Loads `<source>/safety_checker`, `feature_extractor`, `watermarker` (the IF-I repo layout) as switched on."""

    def __init__(
        self, cfg: SafetyConfig, source: str, dtype: str = "float32", device: str = "auto", parts: dict | None = None
    ):
        """Load from `source`, or take already built `parts` (safety_checker, feature_extractor, watermarker)."""
        self.cfg = cfg
        self.device = resolve_device(device)
        self.checker = self.processor = self.watermarker = None
        self.resolved: Resolved | None = None
        if parts is not None:
            if cfg.checker:
                self.checker, self.processor = parts["safety_checker"].to(self.device), parts["feature_extractor"]
            if cfg.watermark:
                self.watermarker = parts["watermarker"]
            return
        self.resolved = self.resolve(cfg, source, dtype)
        if self.resolved is None:
            return
        if cfg.checker:
            from transformers import CLIPImageProcessor

            self.processor = load(
                self.resolved, CLIPImageProcessor.from_pretrained, None, dtype_kw=None, subfolder="feature_extractor"
            )
            self.checker = load(
                self.resolved,
                checker_class().from_pretrained,
                self.device,
                dtype_kw="dtype",
                subfolder="safety_checker",
            ).eval()
        if cfg.watermark:
            from diffusers.pipelines.deepfloyd_if import IFWatermarker

            self.watermarker = load(
                self.resolved, IFWatermarker.from_pretrained, None, dtype_kw=None, subfolder="watermarker"
            )

    @staticmethod
    def resolve(cfg: SafetyConfig, source: str, dtype: str) -> Resolved | None:
        """Check the source before any weights load; None when both switches are off."""
        if not (cfg.checker or cfg.watermark):
            return None
        return resolve("safety", source, cfg.revision, None, dtype, probe_file=probe_file(cfg))

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> SafetyResult:
        n = len(images)
        nsfw: list[bool | None] = [None] * n
        wm_detected: list[bool | None] = [None] * n
        if self.checker is not None:
            clip = self.processor([Image.fromarray(im) for im in images], return_tensors="pt").pixel_values
            clip = clip.to(self.device, self.checker.dtype)
            # The checker zeroes flagged images in place: give it a throwaway copy, keep the real ones.
            _, nsfw, wm_detected = self.checker(
                clip,
                images.astype(np.float32).copy(),
                p_threshold=self.cfg.p_threshold,
                w_threshold=self.cfg.w_threshold,
            )
            nsfw, wm_detected = [bool(x) for x in nsfw], [bool(x) for x in wm_detected]
        if self.watermarker is not None:
            pil = self.watermarker.apply_watermark([Image.fromarray(im) for im in images])
            images = np.stack([np.asarray(p.convert("RGB")) for p in pil])
        return SafetyResult(images, nsfw, wm_detected, [self.watermarker is not None] * n)
