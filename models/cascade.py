"""The cascade's models: which runner serves each stage, and how all of them are checked before anything loads.
What runs them is the stream's steps (tasks/stream/stages.py), one runner each."""

from __future__ import annotations

from ifbatch.configs.schema import STAGES, CascadeConfig

from .encode import TextEncoder
from .safety import Safety
from .scorer import ClipScorer
from .stage_1 import Stage1
from .stage_2 import Stage2
from .stage_3 import Stage3
from .tiny import ensure_tiny_cascade

# The runner of each stage, by its name (a test holds them to the config's stages)
RUNNERS = {runner.name: runner for runner in (TextEncoder, Stage1, ClipScorer, Stage2, Stage3)}


def loaded(cfg: CascadeConfig) -> list[str]:
    """The stages whose models a run loads, in order: every one whose source is set (a null scorer: no scores)."""
    return [name for name in STAGES if getattr(cfg, name).source is not None]


def prepare(cfg: CascadeConfig) -> None:
    """Make sure generated weights exist before anything loads them."""
    if cfg.tiny is not None:
        ensure_tiny_cascade(cfg.tiny.dir, cfg.tiny.seed)


def resolve_cascade(cfg: CascadeConfig) -> tuple[CascadeConfig, dict[str, dict]]:
    """Build generated weights if asked, check every model source, pin hub commits so that every replica loads
    the same revision. Returns the pinned config and what each model is (for the manifest and run record)."""
    prepare(cfg)
    pinned, record = {}, {}
    for name in loaded(cfg):
        section = getattr(cfg, name)
        r = RUNNERS[name].resolve(section)
        record[name] = r.record()
        if r.commit:
            pinned[name] = section.model_copy(update={"revision": r.commit})
    r = Safety.resolve(cfg.safety, cfg.safety_source, cfg.stage_3.dtype)
    if r is not None:
        record["safety"] = r.record()
        if r.commit:
            pinned["safety"] = cfg.safety.model_copy(update={"revision": r.commit})
    return cfg.model_copy(update=pinned), record
