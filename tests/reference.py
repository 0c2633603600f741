"""The model card's code (shared/reference/IF-model-card.md, "Using with diffusers"), as the card writes it, on the
weights a test makes: the oracle ifbatch's images are held against (tests/run/test_parity.py).

Nothing of ifbatch's stages is used here: the card's three `DiffusionPipeline.from_pretrained` calls, its
`encode_prompt`, `stage_1(...)`, `stage_2(...)`, `stage_3(...)` and `pt_to_pil`. What the card leaves to its caller is
taken from the manifest record of the image it is compared with: the steps (or named schedule), guidance and noise
levels, and the generators -- one per row and stage, seeded as ifbatch seeds them (by design ifbatch gives every row
and stage its own generator, where the card threads one `torch.manual_seed(0)` through the three calls).

Departures from the card's text, none of which touches an image: the tiny weights are float32 with no fp16 variant
(the card: `variant="fp16", torch_dtype=torch.float16`); no `enable_model_cpu_offload()` (no GPU); and IF's safety
checker is loaded by a subclass that calls `post_init()` (diffusers 0.42's class does not, and transformers 5's
`from_pretrained` needs it) and handed to `from_pretrained`, as the card's `safety_modules` hand it to stage III.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch


def _checker_class():
    from diffusers.pipelines.deepfloyd_if import IFSafetyChecker

    class Checker(IFSafetyChecker):
        def __init__(self, config):
            super().__init__(config)
            self.post_init()

    return Checker


@dataclass
class CardImages:
    stage_1: np.ndarray  # (64 px in real size) uint8 HWC, as pt_to_pil makes it
    stage_2: np.ndarray
    image: np.ndarray  # the final image as stage III returns it (watermarked)
    nsfw: bool


class Card:
    """The card's three pipelines, loaded from a tiny cascade's folders (IF-I/, IF-II/, x4-upscaler/)."""

    def __init__(self, tiny_dir):
        from diffusers import DiffusionPipeline
        from diffusers.utils import logging

        before = logging.get_verbosity()
        logging.set_verbosity_error()  # not the whole checker's repr, which diffusers logs for a subclass handed in
        try:
            self._load(tiny_dir, DiffusionPipeline)
        finally:
            logging.set_verbosity(before)
        for pipe in (self.stage_1, self.stage_2, self.stage_3):
            pipe.set_progress_bar_config(disable=True)

    def _load(self, tiny_dir, DiffusionPipeline) -> None:
        # stage 1
        checker = _checker_class().from_pretrained(f"{tiny_dir}/IF-I", subfolder="safety_checker")
        self.stage_1 = DiffusionPipeline.from_pretrained(f"{tiny_dir}/IF-I", safety_checker=checker)
        # stage 2
        self.stage_2 = DiffusionPipeline.from_pretrained(f"{tiny_dir}/IF-II", text_encoder=None)
        # stage 3
        safety_modules = {
            "feature_extractor": self.stage_1.feature_extractor,
            "safety_checker": self.stage_1.safety_checker,
            "watermarker": self.stage_1.watermarker,
        }
        self.stage_3 = DiffusionPipeline.from_pretrained(f"{tiny_dir}/x4-upscaler", **safety_modules)

    def __call__(self, record: dict, clean_caption: bool = False) -> CardImages:
        """The card's calls for one manifest record: its prompt and negative prompt as the user gave them, its seed
        (the chosen candidate's), and the stage parameters it records."""
        from diffusers.utils import pt_to_pil

        from ifbatch.models.seeding import derive_seed  # how ifbatch seeds a row's generator for a stage

        prompt, negative = record["prompt"], record["negative_prompt"] or None
        seed = record["candidate_seed"] if record["candidate_seed"] is not None else record["seed"]

        def generator(stage: str) -> torch.Generator:
            return torch.Generator("cpu").manual_seed(derive_seed(seed, stage))

        # text embeds
        prompt_embeds, negative_embeds = self.stage_1.encode_prompt(
            prompt, negative_prompt=negative, clean_caption=clean_caption
        )
        # stage 1
        image = self.stage_1(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            generator=generator("stage_1"),
            output_type="pt",
            **_schedule(record, "stage_1"),
        ).images
        stage_1 = np.asarray(pt_to_pil(image)[0])
        # stage 2
        image = self.stage_2(
            image=image,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            generator=generator("stage_2"),
            output_type="pt",
            noise_level=record["stage_2_noise_level"],
            **_schedule(record, "stage_2"),
        ).images
        stage_2 = np.asarray(pt_to_pil(image)[0])
        # stage 3 (the card hands it stage II's [-1, 1] tensor, which diffusers takes with a FutureWarning)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Passing `image` as torch tensor with value range in", FutureWarning)
            out = self.stage_3(
                prompt=prompt,
                negative_prompt=negative,
                image=image,
                generator=generator("stage_3"),
                noise_level=record["stage_3_noise_level"],
                **_schedule(record, "stage_3"),
            )
        nsfw = out.nsfw_content_detected  # None: no checker
        return CardImages(stage_1, stage_2, np.asarray(out.images[0].convert("RGB")), bool(nsfw and nsfw[0]))


def _schedule(record: dict, stage: str) -> dict:
    """The steps, or the named schedule as diffusers ships it, and the guidance a record says its stage ran with."""
    from diffusers.pipelines.deepfloyd_if import timesteps

    named = record.get(f"{stage}_timesteps")
    steps = (
        {"timesteps": list(getattr(timesteps, f"{named}_timesteps"))}
        if named
        else {"num_inference_steps": record[f"{stage}_steps"]}
    )
    return {**steps, "guidance_scale": record[f"{stage}_guidance_scale"]}


# Grey levels (of 255) an ifbatch image may differ from the card's at any pixel: tests/run/test_parity.py says why.
TOLERANCE = 2


def grey_levels(a: np.ndarray, b: np.ndarray) -> int:
    """The largest difference between two uint8 images of one shape."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def assert_final_images_are_the_cards(card: Card, loc, records: list[dict]) -> None:
    """Each recorded image, as written, within TOLERANCE of the card's final image for its record."""
    import io

    from PIL import Image

    from ifbatch.tasks.outputs.formats import read_image

    for r in records:
        mine = np.asarray(Image.open(io.BytesIO(read_image(loc, r))).convert("RGB"))
        diff = grey_levels(mine, card(r).image)
        assert diff <= TOLERANCE, f"{r['id']} ({r['prompt']!r}): {diff} grey levels from the card's image"
