"""Reference parity: ifbatch's images are the model card's images (tests/reference.py), stage by stage.

Each test runs the run engine on the local executor (the stage classes the Ray actors run, chained in this process)
and holds every image it made, its 64 px and 256 px intermediates too (16 and 64 px on the tiny cascade), against
the card's calls given that image's manifest record. The Ray executor's images: tests/e2e/test_pipeline.py.

Tolerance: 2 grey levels (of 255) at every stage, per pixel. What it allows, measured on the tiny cascade (float32):
- a batch: a row computed with batch mates sums its matmuls in another order than the card's batch of one; float32
  rounding, amplified a little by each denoising step, moves a 256 px pixel by at most 1 level (0 in a batch of 1);
- stage III's input range: ifbatch hands the x4 upscaler its image in [0, 1], the range diffusers documents, and
  the card hands it stage II's [-1, 1] tensor, which diffusers takes through a deprecated path (no normalisation,
  decided by the whole batch's minimum). The round trip (x + 1) / 2 * 2 - 1 loses a float32 ulp: at most 1 level.
What it does not allow: any real difference of text, seed, schedule, guidance or noise level moves pixels by tens to
hundreds of levels (a prompt's capital letters, before the text was preprocessed as the card does: 75-112).

The deliberate differences, shown here to be only that: one generator per row and stage (the card's calls get
ifbatch's); flags where the card's stage III would black out an image its safety checker flags
(test_a_flagged_image_is_kept_and_flagged_where_the_card_would_black_it_out).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ifbatch.configs import load_config
from ifbatch.tasks.outputs.formats import read_image
from ifbatch.tasks.outputs.manifest import read_manifest
from ifbatch.tasks.run import Run
from ifbatch.tasks.storage import locate
from ifbatch.tasks.stream.local import LocalExecutor
from ifbatch.tasks.stream.stages import STEPS

from ..helpers import write_table
from ..reference import TOLERANCE, Card, grey_levels

pytestmark = pytest.mark.slow

LONG = " ".join(["a photo of a small red house in the forest near the river under the blue sky"] * 6)  # > 77 tokens
# What a new user's table holds: capitals, stray spaces, unicode, a prompt T5 must truncate, custom negatives, and
# per-row steps, guidance and noise levels mixed in one batch (rows 0-3 and 4-5 each fill a batch of 4).
TABLE = {
    "prompt": [
        "A Red Car on the Beach",
        "  Mount Fuji at dawn  ",
        "Ein Fuchs im Schnee \u2014 \u00c9T\u00c9, \u6771\u4eac\u306e\u591c",
        LONG.upper(),
        "Two OWLS on a Fence at Night",
        "a lighthouse in fog",
    ],
    "negative_prompt": [None, "Blurry, DARK  ", None, None, "  Low Quality", None],
    "seed": [1, 2, 3, 4, 5, 6],
    "n": [1, 1, 1, 1, 1, 2],
    "stage_1_steps": [None, None, None, None, 3, None],
    "stage_1_guidance_scale": [None, None, None, None, 1.0, 9.5],
    "stage_2_noise_level": [None, None, None, None, 400, 20],
    "stage_3_guidance_scale": [None, None, None, None, 3.0, None],
    "stage_3_noise_level": [None, None, None, None, 350, 0],
}


def recording(cls, column: str, seen: dict):
    """A stage class that also keeps, by image id, the images it hands on in `column` (the local executor runs it in
    place of the stage's own class; what it computes is the stage's own)."""

    class Recorded(cls):
        def compute(self, batch, idx, params):
            out = super().compute(batch, idx, params)
            if column in out:
                for j, i in enumerate(idx):
                    seen[str(batch["id"][i])] = out[column][j]
            return out

    return Recorded


class Harness:
    """Runs of ifbatch's local executor (models loaded once for the module), and their images against the card's."""

    def __init__(self, tiny_dir: Path):
        self.tiny_dir = tiny_dir
        self.card = Card(tiny_dir)
        self.stage_1: dict[str, np.ndarray] = {}
        self.stage_2: dict[str, np.ndarray] = {}
        actors = {
            "stage_1": recording(STEPS["stage_1"], "image_1", self.stage_1),
            "scorer": recording(STEPS["scorer"], "image_1", self.stage_1),  # best of k: the chosen candidate
            "stage_2": recording(STEPS["stage_2"], "image_2", self.stage_2),
        }
        self.executor = LocalExecutor(actors)

    def run(self, tmp_path: Path, table: dict, overrides: list[str], tiny_dir: Path | None = None) -> list[dict]:
        """One run of `table` with `overrides`; its manifest records (each checked ok)."""
        prompts = write_table(tmp_path / "prompts.parquet", table)
        out = str(tmp_path / "out")
        sets = [f"tiny.dir={tiny_dir or self.tiny_dir}", "executor=local", *overrides]
        Run({"prompts": prompts, "output": out, "overrides": sets}, load_config("tiny", sets), executor=self.executor)()
        self.loc = locate(out)
        records = read_manifest(self.loc).to_pylist()
        assert records and all(r["status"] == "ok" for r in records), [r["error"] for r in records]
        return records

    def ifbatch_images(self, record: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The 64 and 256 px images as the card's `pt_to_pil` shows them, and the final image as written."""
        from diffusers.utils import pt_to_pil

        def pil(x: np.ndarray) -> np.ndarray:
            return np.asarray(pt_to_pil(torch.from_numpy(x[None]))[0])

        final = Image.open(io.BytesIO(read_image(self.loc, record)))  # of the last run
        i = record["id"]
        return pil(self.stage_1[i]), pil(self.stage_2[i]), np.asarray(final.convert("RGB"))

    def check(self, records: list[dict], clean_caption: bool = False, card: Card | None = None) -> dict[str, int]:
        """Every record's three images within TOLERANCE of the card's; the largest difference at each stage."""
        worst = dict.fromkeys(("stage_1", "stage_2", "image"), 0)
        for r in records:
            ref = (card or self.card)(r, clean_caption=clean_caption)
            assert not ref.nsfw and r["nsfw"] is False, r["id"]  # the tiny checker flags nothing (the last test does)
            for stage, mine in zip(worst, self.ifbatch_images(r), strict=True):
                diff = grey_levels(mine, getattr(ref, stage))
                assert diff <= TOLERANCE, f"{r['id']} ({r['prompt']!r}) {stage}: {diff} grey levels from the card's"
                worst[stage] = max(worst[stage], diff)
        return worst


@pytest.fixture(scope="module")
def harness(tiny_dir):
    return Harness(tiny_dir)


def test_a_new_users_table_gives_the_cards_images(harness, tmp_path):
    """Capitals, spaces, unicode, truncation, custom negatives, per-row steps, guidance and noise levels, n images
    per prompt, in batches of 4 (rows of other parameters in one batch)."""
    records = harness.run(tmp_path, TABLE, [])
    assert len(records) == 7
    by_prompt = {r["prompt"]: r for r in records}
    assert "A Red Car on the Beach" in by_prompt  # the prompt as the user gave it ...
    assert all(r["text_preprocessing"] == "lower-strip" for r in records)  # ... and how T5 was given it
    assert by_prompt[LONG.upper()]["truncated"] and not by_prompt["A Red Car on the Beach"]["truncated"]
    owls = by_prompt["Two OWLS on a Fence at Night"]
    assert (owls["stage_1_steps"], owls["stage_2_noise_level"], owls["stage_3_noise_level"]) == (3, 400, 350)
    harness.check(records)


def test_a_row_alone_in_its_batch_is_the_cards_bit_for_bit_until_the_upscalers_input(harness, tmp_path):
    """Batches of 1: no batch mates to change the order of a row's sums, so stages I and II are the card's exactly
    (capitals, a custom negative and per-row parameters among them); stage III within the input range's ulp."""
    rows = [0, 4, 5]  # capitals; capitals, a negative and other steps, guidance and noise levels; n = 2
    table = {k: [v[i] for i in rows] for k, v in TABLE.items()}
    sizes = [f"{s}.batch_size=1" for s in ("text_encoder", "stage_1", "stage_2", "stage_3")]
    worst = harness.check(harness.run(tmp_path, table, sizes))
    assert worst["stage_1"] == worst["stage_2"] == 0, worst


def test_named_timestep_schedules_give_the_cards_images(harness, tmp_path):
    """A named IF schedule at stage I and at stage II, the pair diffusers' IF docs use (the card's calls get diffusers'
    own lists). That every preset name is diffusers' list: tests/unit/test_params.py."""
    sets = ["stage_1.timesteps=fast27", "stage_2.timesteps=smart27"]
    records = harness.run(tmp_path, {"prompt": ["A Cat IN the rain"], "seed": [7]}, sets)
    assert (records[0]["stage_1_timesteps"], records[0]["stage_2_timesteps"]) == ("fast27", "smart27")
    harness.check(records)


def test_clean_caption_cleans_as_the_card_does(harness, tmp_path):
    """text_encoder.clean_caption: IF's full caption cleaning, the card's `encode_prompt(..., clean_caption=True)`."""
    table = {
        "prompt": ["<b>A Red Car</b> on the Beach https://example.com/car.jpg", "Mount Fuji #sunrise @someone"],
        "negative_prompt": ["<i>Blurry</i>", None],
    }
    records = harness.run(tmp_path, table, ["text_encoder.clean_caption=true"])
    assert {r["text_preprocessing"] for r in records} == {"clean-caption"}
    harness.check(records, clean_caption=True)


def test_one_candidate_with_the_scorer_in_the_stream_gives_the_cards_images(harness, tmp_path):
    """candidates_per_image=1 with the scorer running (a score floor no image misses) makes the images of a run
    without a scorer: candidate 0 is the row's own seed. (Best of k > 1 against the card: tests/e2e.)"""
    records = harness.run(tmp_path, {"prompt": TABLE["prompt"][:2], "seed": [1, 2]}, ["data.min_clip_score=-100"])
    assert all(r["candidate"] == 0 and len(r["candidate_scores"]) == 1 for r in records)
    harness.check(records)


def test_compiled_stages_give_the_cards_images(harness, tmp_path):
    """compile: true (torch.compile of each UNet, warmed up on the batch shape) gives the card's (eager) images, also
    for a batch shorter than batch_size (3 rows of 4: padded, then cut back). Backend aot_eager: dynamo's graph
    capture as with inductor, without generating kernels (inductor compiled the tiny stage I UNet for over 10 minutes
    on these 2 cores). Stages I and III: the two pipelines (IF's and the x4 upscaler's); stage II is stage I's UNet
    class, and the compiling is one code path for all (models/runner.py)."""
    compiled = [f"{s}.{k}" for s in ("stage_1", "stage_3") for k in ("compile=true", "compile_backend=aot_eager")]
    records = harness.run(tmp_path, {"prompt": TABLE["prompt"][:3], "seed": [1, 2, 3]}, compiled)
    harness.check(records)


def test_a_flagged_image_is_kept_and_flagged_where_the_card_would_black_it_out(harness, tmp_path):
    """The one place ifbatch's image is not the card's by design. A cascade whose safety checker flags every image
    (the tiny one's, its NSFW head's bias raised). The card's stage III means to return a black image for it; with
    diffusers 0.42 it cannot: IF's checker writes numpy zeros into the upscaler's torch tensor and the call fails
    (TypeError), so the card's recipe loses the whole batch. ifbatch keeps each image, records nsfw = true, and the
    image is the card's with the checker taken out of its stage III."""
    from tests.reference import _checker_class

    flagged = tmp_path / "flagging-cascade"
    shutil.copytree(harness.tiny_dir, flagged)
    checker = _checker_class().from_pretrained(flagged / "IF-I", subfolder="safety_checker")
    with torch.no_grad():
        checker.p_head.bias += 100.0
    checker.save_pretrained(flagged / "IF-I" / "safety_checker")
    records = harness.run(tmp_path, {"prompt": TABLE["prompt"][:2], "seed": [1, 2]}, [], tiny_dir=flagged)
    assert all(r["nsfw"] is True and r["watermarked"] is True for r in records)
    card = Card(flagged)
    with pytest.raises(TypeError, match="numpy.ndarray"):
        card(records[0])
    card.stage_3.safety_checker = None  # the card's stage III without the black-out: ifbatch's images
    for r in records:
        ref = card(r)
        _, _, mine = harness.ifbatch_images(r)
        assert grey_levels(mine, ref.image) <= TOLERANCE, r["id"]
