"""What the three diffusion stages share: how each is found, loaded and given its parameters, said once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from .loading import Resolved, load, resolve, resolve_device, torch_dtype
from .params import StageParams
from .seeding import generators
from .tensors import to_torch

# Stages I and II get T5 embeddings from the text stage; they load no text encoder and no safety parts.
NO_TEXT_OR_SAFETY = dict(
    text_encoder=None,
    tokenizer=None,
    safety_checker=None,
    feature_extractor=None,
    watermarker=None,
    requires_safety_checker=False,
)


class DiffusionStage:
    """A diffusers pipeline of the cascade, loaded from `cfg.source` (hub id or local directory)."""

    name: ClassVar[str]
    pipeline: ClassVar[str]  # the diffusers class
    load_kwargs: ClassVar[dict[str, Any]] = {}
    probe_file: ClassVar[str] = "model_index.json"  # what `resolve` fetches to check a hub source

    def __init__(self, cfg: Any, device: str = "auto", pipe: Any = None):
        """Load from cfg.source, or wrap an already built `pipe` (benchmarks of random-weight models)."""
        self.cfg = cfg
        self.device = resolve_device(device)
        self.dtype = torch_dtype(cfg.dtype)
        self.defaults = StageParams.of(cfg)
        self.resolved: Resolved | None = None
        if pipe is None:
            import diffusers

            self.resolved = self.resolve(cfg)
            pipe = load(
                self.resolved,
                getattr(diffusers, self.pipeline).from_pretrained,
                self.device,
                variant=cfg.variant,
                **self.load_kwargs,
            )
        self.pipe = pipe
        self.pipe.set_progress_bar_config(disable=True)
        self.compiled = bool(getattr(cfg, "compile", False))
        if self.compiled:
            # in place: the pipeline keeps its UNet (and its config)
            self.pipe.unet.compile(backend=getattr(cfg, "compile_backend", "inductor"))

    def pad(self, n: int, *columns: Any) -> tuple[Any, ...]:
        """A compiled stage always runs at its batch size (a new shape would compile again): short columns (arrays
        or lists, one entry per row) are padded by repeating their last row. Every row has its own generator, so
        the padding changes no real row's image; the caller keeps the first n outputs."""
        k = self.cfg.batch_size - n
        if not self.compiled or k <= 0:
            return columns
        return tuple(
            np.concatenate([c, np.repeat(c[-1:], k, axis=0)]) if isinstance(c, np.ndarray) else [*c, *[c[-1]] * k]
            for c in columns
        )

    def warm_up(self, *example: Any) -> None:
        """Compile now, at actor start, on the stage's batch shape (one call on `example`), not on the first batch."""
        if self.compiled:
            self(*example)

    @classmethod
    def resolve(cls, cfg: Any) -> Resolved:
        """Check the source before any weights load (and pin a hub commit)."""
        return resolve(cls.name, cfg.source, cfg.revision, cfg.variant, cfg.dtype, probe_file=cls.probe_file)

    @property
    def size(self) -> int:
        """The side of the images this stage's UNet makes (the x4 upscaler's works on latents)."""
        return int(self.pipe.unet.config.sample_size)

    def params(self, given: StageParams | None) -> StageParams:
        return self.defaults if given is None else given

    def tensor(self, a: np.ndarray) -> torch.Tensor:
        """Stage input from the object store, on this stage's device and dtype."""
        return to_torch(a, self.device, self.dtype)

    def call_kwargs(self, seeds: Sequence[int], params: StageParams | None) -> dict[str, Any]:
        """The pipeline keywords every stage passes: guidance, schedule, noise level, one generator per row."""
        p = self.params(params)
        kwargs = dict(guidance_scale=p.guidance_scale, generator=generators(seeds, self.name), **p.schedule_kwargs())
        if p.noise_level is not None:
            kwargs["noise_level"] = p.noise_level
        return kwargs
