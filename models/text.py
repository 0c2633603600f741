"""Prompt text as IF's reference encodes it: diffusers' own `IFPipeline._text_preprocessing`, the function the model
card's `stage_1.encode_prompt(prompt)` runs on every prompt and negative prompt before T5.

IF was trained on captions so preprocessed: lowercased and stripped (`clean_caption=False`, what `encode_prompt`
does by default), or fully cleaned (`clean_caption=True`: HTML, URLs, CJK punctuation ..., what `IFPipeline.__call__`
does with a text prompt). T5's vocabulary is cased, so the raw text gives other embeddings and other images.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

# What the manifest's `text_preprocessing` column says of each image, by text_encoder.clean_caption.
NAMES = {False: "lower-strip", True: "clean-caption"}


def preprocessing(clean_caption: bool) -> str:
    return NAMES[bool(clean_caption)]


def check_clean_caption(clean_caption: bool) -> None:
    """diffusers quietly falls back to lower-strip when bs4 or ftfy is missing; ifbatch refuses instead."""
    if not clean_caption:
        return
    missing = [m for m in ("bs4", "ftfy") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"text_encoder.clean_caption = true needs {' and '.join(missing)} (pip install beautifulsoup4 ftfy), "
            f"which this environment lacks; install them or set text_encoder.clean_caption=false"
        )


def preprocess(texts: Sequence[str], clean_caption: bool) -> list[str]:
    """The texts as the reference gives them to the tokenizer."""
    from diffusers import IFPipeline

    check_clean_caption(clean_caption)
    # The method reads nothing of a loaded pipeline (only class attributes): an instance without models will do.
    return IFPipeline._text_preprocessing(object.__new__(IFPipeline), list(texts), clean_caption=bool(clean_caption))
