"""The text stage: T5-v1_1-XXL embeddings for prompts and negative prompts, loaded once, reused by stages I and II."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ifbatch.configs.schema import TextEncoderConfig

from .loading import Resolved, load, resolve, resolve_device
from .tensors import to_numpy
from .text import check_clean_caption, preprocess

PROBE_FILE = "text_encoder/config.json"  # what `resolve` fetches to check a source holds a text encoder


@dataclass
class Encoded:
    prompt_embeds: np.ndarray  # (B, max_length, D)
    negative_embeds: np.ndarray  # (B, max_length, D)
    truncated: list[bool]  # the encoded (preprocessed) prompt is longer than max_length tokens
    negative_truncated: list[bool]


class TextEncoder:
    """Tokenizer + T5 encoder from `<source>/tokenizer` and `<source>/text_encoder` (the IF-I repo layout). Prompts
    and negative prompts are preprocessed as the model card's `encode_prompt` does (models/text.py) first."""

    name = "text_encoder"

    def __init__(self, cfg: TextEncoderConfig, device: str = "auto", tokenizer=None, model=None):
        """Load from cfg.source, or wrap an already built tokenizer and model (benchmarks)."""
        from transformers import AutoTokenizer, T5EncoderModel

        check_clean_caption(cfg.clean_caption)
        self.cfg = cfg
        self.device = resolve_device(device)
        self.resolved: Resolved | None = None
        if model is None:
            self.resolved = self.resolve(cfg)
            tokenizer = load(self.resolved, AutoTokenizer.from_pretrained, None, dtype_kw=None, subfolder="tokenizer")
            model = load(
                self.resolved,
                T5EncoderModel.from_pretrained,
                self.device,
                dtype_kw="dtype",
                subfolder="text_encoder",
                variant=cfg.variant,
            )
        self.tokenizer, self.model = tokenizer, model.eval()
        self._empty: torch.Tensor | None = None

    @classmethod
    def resolve(cls, cfg: TextEncoderConfig) -> Resolved:
        """Check the source before any weights load (and pin a hub commit)."""
        return resolve(cls.name, cfg.source, cfg.revision, cfg.variant, cfg.dtype, probe_file=PROBE_FILE)

    @torch.inference_mode()
    def _embed(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.cfg.max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        out = self.model(tok.input_ids.to(self.device), attention_mask=tok.attention_mask.to(self.device))
        return out[0]

    def _too_long(self, texts: Sequence[str]) -> list[bool]:
        lengths = self.tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        return [len(ids) > self.cfg.max_length for ids in lengths]

    def empty_embedding(self) -> torch.Tensor:
        """The embedding of "" (the usual negative prompt), computed once."""
        if self._empty is None:
            self._empty = self._embed([""])[0]
        return self._empty

    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str | None] | None = None) -> Encoded:
        """Prompts as given (the manifest keeps them so); the text T5 reads is the reference's preprocessing of
        them, and `truncated` is said of that text."""
        negatives = [n or "" for n in (negative_prompts or [""] * len(prompts))]
        if len(negatives) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(negatives)} negative prompts; one each is expected")
        prompts = preprocess(prompts, self.cfg.clean_caption)
        negatives = preprocess(negatives, self.cfg.clean_caption)
        embeds = self._embed(prompts)
        neg = self.empty_embedding().expand_as(embeds).clone()
        custom = [i for i, n in enumerate(negatives) if n]
        if custom:
            neg[custom] = self._embed([negatives[i] for i in custom])
        return Encoded(to_numpy(embeds), to_numpy(neg), self._too_long(prompts), self._too_long(negatives))
