"""The tiny cascade end to end, in process, on the CPU: shapes, determinism, batch independence, loading."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ifbatch.configs import load_config
from ifbatch.models.loading import ModelLoadError
from ifbatch.models.safety import Safety
from ifbatch.models.stage_1 import Stage1
from ifbatch.models.timesteps import schedule
from ifbatch.models.tiny import build_tiny_cascade

from .cascade import Cascade

pytestmark = pytest.mark.slow

PROMPTS = ["a photo of a cat", "a red car in the rain at night", "an oil painting of a castle", "a dog"]
NEGATIVES = ["", "blurry", None, "dark"]
SEEDS = [11, 22, 33, 44]


@pytest.fixture(scope="module")
def cascade(tiny_cfg):
    return Cascade(tiny_cfg)


@pytest.fixture(scope="module")
def batch(cascade):
    return cascade(PROMPTS, SEEDS, NEGATIVES)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_shapes_and_ranges_at_every_stage(batch):
    assert batch.stage_1.shape == (4, 3, 16, 16) and batch.stage_1.dtype == np.float32
    assert batch.stage_2.shape == (4, 3, 64, 64) and batch.stage_2.dtype == np.float32
    assert batch.images.shape == (4, 256, 256, 3) and batch.images.dtype == np.uint8
    for x in (batch.stage_1, batch.stage_2):
        assert np.isfinite(x).all() and x.min() >= -1.0 and x.max() <= 1.0 and x.std() > 0.05
    assert batch.images.std() > 5  # not a blank image
    assert set(batch.seconds) == {"text_encoder", "stage_1", "stage_2", "stage_3"}


def test_same_seeds_give_the_same_bytes(cascade, batch):
    again = cascade(PROMPTS, SEEDS, NEGATIVES)
    assert again.images.tobytes() == batch.images.tobytes()
    assert again.stage_1.tobytes() == batch.stage_1.tobytes()


def test_other_seeds_give_other_images(cascade, batch):
    other = cascade(PROMPTS, [s + 1 for s in SEEDS], NEGATIVES)
    for i in range(4):
        assert not np.array_equal(other.images[i], batch.images[i])


def test_a_row_does_not_depend_on_its_batch(cascade, batch):
    for i in (0, 2):
        alone = cascade([PROMPTS[i]], [SEEDS[i]], [NEGATIVES[i]])
        # Batched matmuls sum in another order: float32 rounding, amplified a little by each denoising step.
        # A real dependence on batch mates (a shared generator, a mixed-up row) differs by O(1).
        np.testing.assert_allclose(alone.stage_1[0], batch.stage_1[i], atol=1e-4)
        np.testing.assert_allclose(alone.stage_2[0], batch.stage_2[i], atol=2e-3)
        diff = np.abs(alone.images[0].astype(int) - batch.images[i].astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())


def test_negative_prompts_are_per_row(cascade, batch):
    swapped = cascade(PROMPTS[:2], SEEDS[:2], ["", ""])
    assert (
        np.array_equal(swapped.images[0], batch.images[0])
        or np.abs(swapped.images[0].astype(int) - batch.images[0].astype(int)).max() <= 1
    )  # row 0 had "" already
    assert np.abs(swapped.stage_1[1] - batch.stage_1[1]).max() > 1e-3  # row 1 lost its "blurry"


def test_long_prompts_are_truncated_and_reported(cascade):
    enc = cascade.encoder.encode(["a cat", "a very detailed " * 40], ["", ""])
    assert enc.truncated == [False, True]
    assert enc.prompt_embeds.shape == (2, 77, 32)


def test_save_load_round_trip_is_byte_identical(tiny_dir, tmp_path, tiny_cfg, batch):
    copy = build_tiny_cascade(tmp_path / "again", seed=0)
    assert tree_digest(copy) == tree_digest(tiny_dir)  # same seed, same bytes
    reloaded = Cascade(load_config("tiny", [f"tiny.dir={copy}"]))
    out = reloaded(PROMPTS, SEEDS, NEGATIVES)
    assert out.images.tobytes() == batch.images.tobytes()


def test_another_weight_seed_gives_other_weights(tiny_dir, tmp_path):
    other = build_tiny_cascade(tmp_path / "seed1", seed=1)
    a, b = tree_digest(other), tree_digest(tiny_dir)
    assert (
        a.keys() == b.keys()
        and a["IF-I/unet/diffusion_pytorch_model.safetensors"] != b["IF-I/unet/diffusion_pytorch_model.safetensors"]
    )


def test_named_timestep_schedule(tiny_cfg):
    cfg = load_config("tiny", [f"tiny.dir={tiny_cfg.tiny.dir}", "stage_1.timesteps=fast27"])
    stage = Stage1(cfg.stage_1, "cpu")
    e = np.random.default_rng(0).standard_normal((1, 77, 32)).astype(np.float32) * 0.2
    out = stage(e, np.zeros_like(e), [1])
    assert out.shape == (1, 3, 16, 16)
    assert stage.pipe.scheduler.timesteps.tolist() == schedule("fast27")


def test_safety_flags_and_watermark(tiny_cfg, batch):
    assert batch.nsfw == [False] * 4 or all(isinstance(x, bool) for x in batch.nsfw)
    assert all(isinstance(x, bool) for x in batch.watermark_detected) and batch.watermarked == [True] * 4
    plain = Cascade(
        load_config("tiny", [f"tiny.dir={tiny_cfg.tiny.dir}", "safety.checker=false", "safety.watermark=false"])
    )
    out = plain(PROMPTS, SEEDS, NEGATIVES)
    assert out.nsfw == [None] * 4 and out.watermarked == [False] * 4
    differ = np.any(out.images != batch.images, axis=-1)  # pixels the watermark touched
    h, w = differ.shape[1:]
    assert differ[:, h - 20 :, w - 20 :].any() and not differ[:, : h // 2, : w // 2].any()


def test_flagged_images_are_reported_not_blacked_out(tiny_cfg, batch):
    safety = Safety(tiny_cfg.safety.model_copy(update={"watermark": False}), tiny_cfg.safety_source, device="cpu")
    with torch.no_grad():  # make the checker's NSFW head fire on everything
        safety.checker.p_head.bias.fill_(100.0)
    out = safety(batch.images)
    assert out.nsfw == [True] * 4
    assert np.array_equal(out.images, batch.images)  # flagged, yet passed through untouched, never blacked out


def test_missing_local_directory_is_named(tmp_path):
    cfg = load_config("if-xl", [f"stage_1.source={tmp_path}/nope", "device=cpu"])
    with pytest.raises(ModelLoadError, match=r"stage_1.*nope.*does not exist"):
        Stage1(cfg.stage_1, "cpu")


DAMAGED = ["IF-I/text_encoder/model.safetensors", "IF-II/unet/diffusion_pytorch_model.safetensors"]


@pytest.mark.parametrize("damaged", DAMAGED)
def test_a_damaged_weights_file_is_named(tiny_dir, tmp_path, damaged):
    """A truncated download or a bad disk: transformers (T5) and diffusers (a UNet) fail in different ways, and
    both are said as the model that cannot load and the file."""
    from ifbatch.models.encode import TextEncoder
    from ifbatch.models.stage_2 import Stage2

    copy = tmp_path / "cascade"
    shutil.copytree(tiny_dir, copy)
    (copy / damaged).write_bytes(b"\x00" * 64)
    cfg = load_config("tiny", [f"tiny.dir={copy}"])
    role = "text_encoder" if "text_encoder" in damaged else "stage_2"
    with pytest.raises(ModelLoadError, match=rf"cannot load {role} model from '{copy}") as e:
        TextEncoder(cfg.text_encoder, "cpu") if role == "text_encoder" else Stage2(cfg.stage_2, "cpu")
    assert damaged.split("/")[0] in str(e.value)


def _load_in_subprocess(env: dict[str, str], prelude: str = "") -> str:
    code = prelude + textwrap.dedent("""
        from ifbatch.configs import load_config
        from ifbatch.models.stage_1 import Stage1
        try:
            Stage1(load_config("if-xl").stage_1, "cpu")
        except Exception as e:
            print(type(e).__name__, e)
    """)
    res = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    return res.stdout or res.stderr


def test_offline_hub_id_gives_a_clear_error():
    out = _load_in_subprocess({"HF_HUB_OFFLINE": "1"})
    assert out.startswith("ModelLoadError")
    for text in ("stage_1", "'DeepFloyd/IF-I-XL-v1.0'", "HF_HUB_OFFLINE=1", "local directory", "hf download"):
        assert text in out, (text, out)


def test_gated_hub_id_says_log_in_and_accept_the_licence():
    # A real HTTP endpoint that answers as the hub does for a gated repo without access.
    prelude = textwrap.dedent("""
        import http.server, os, threading
        class Gated(http.server.BaseHTTPRequestHandler):
            def answer(self):
                self.send_response(403)
                self.send_header("X-Error-Code", "GatedRepo")
                self.send_header("X-Error-Message", "Access to this model is restricted.")
                self.send_header("Content-Length", "0")
                self.end_headers()
            do_HEAD = do_GET = answer
            def log_message(self, *a): pass
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gated)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{srv.server_port}"
    """)
    out = _load_in_subprocess({"HF_HUB_OFFLINE": "0"}, prelude)
    assert out.startswith("ModelLoadError"), out
    for text in ("'DeepFloyd/IF-I-XL-v1.0'", "gated", "hf auth login", "accept the licence", "local directory"):
        assert text in out, (text, out)


def test_tiny_clip_scores_each_image_against_its_prompt_through_the_real_loading_code(tmp_path):
    """The scorer of best of k: a seeded random-weight CLIP saved like a hub repo and loaded back through
    models.loading; one score per image, the same whatever its batch; same seed, same bytes."""
    from ifbatch.configs.schema import ScorerConfig
    from ifbatch.models.loading import ModelLoadError
    from ifbatch.models.scorer import ClipScorer
    from ifbatch.models.tiny import build_tiny_clip

    a, b = build_tiny_clip(tmp_path / "a", seed=0), build_tiny_clip(tmp_path / "b", seed=0)
    other = build_tiny_clip(tmp_path / "c", seed=1)
    weights = [(d / "model.safetensors").read_bytes() for d in (a, b, other)]
    assert weights[0] == weights[1] != weights[2]
    scorer = ClipScorer(ScorerConfig(source=str(a), dtype="float32", batch_size=2), device="cpu")
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    prompts = ["a photo of a cat", "a red car", "a castle in the snow"]
    scores = scorer(images, prompts)
    assert scores.shape == (3,) and scores.dtype == np.float32 and np.all(np.abs(scores) <= 100)
    alone = np.array([scorer(images[i : i + 1], prompts[i : i + 1])[0] for i in range(3)])
    np.testing.assert_allclose(alone, scores, atol=1e-3)  # a score does not depend on its batch mates
    assert scorer(images[:1], ["a dog"])[0] != scores[0]  # the prompt matters
    assert scorer.record["source"] == str(a) and scorer.record["dtype"] == "float32"
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        scorer(images, prompts[:2])
    with pytest.raises(ModelLoadError, match="scorer"):
        ClipScorer(ScorerConfig(source=str(tmp_path / "missing")), device="cpu")
