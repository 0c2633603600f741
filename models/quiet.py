"""Library log lines that tell an ifbatch user nothing they can act on, silenced where they are made.

`IFBATCH_VERBOSE=1` (the CLI's `--verbose`, passed on to the Ray workers) leaves every library line as it is.
"""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "IFBATCH_VERBOSE"

# logger -> the starts of the messages dropped from it, each with why it carries no action
DROPPED: dict[str, tuple[str, ...]] = {
    # torchvision is left out on purpose (PyPI's build does not import beside this torch): the PIL image processor
    # transformers falls back to is the one the safety checker's feature extractor is meant to use here
    "transformers.utils.import_utils": ("`CLIPImageProcessor` requires torchvision",),
    # the x4 upscaler's CLIP tokenizer measuring a long prompt; the T5 truncation that shapes stages I and II is
    # what ifbatch records per row (manifest `truncated`)
    "transformers.tokenization_utils_base": ("Token indices sequence length is longer",),
}
# logger -> the level below which it is silent
LEVELS: dict[str, int] = {
    # the upscaler dumps the removed CLIP token ids (padding included) for every truncated prompt of a batch
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_upscale": logging.ERROR,
}


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def drop_messages(logger: str, *starts: str) -> None:
    """Drop the records of `logger` (not of its children) whose message starts with any of `starts`."""
    logging.getLogger(logger).addFilter(_DropMessages(starts))


_quieted = False


def quiet_libraries() -> None:
    """Idempotent and import-free, so it can run before the libraries load: the lines listed above go."""
    global _quieted
    if _quieted or verbose():
        return
    _quieted = True
    for name, starts in DROPPED.items():
        drop_messages(name, *starts)
    for name, level in LEVELS.items():
        logging.getLogger(name).setLevel(level)


def quiet_progress_bars() -> None:
    """No loading or saving bars from diffusers and transformers: ifbatch reports progress itself."""
    if verbose():
        return
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
