"""Build a complete, seeded, random-weight IF cascade offline and save it like the real hub repos.

The UNets keep the real block layouts (from `arch/`), only narrow: 16 -> 64 -> 256 px. Loaded back through
`models.loading` exactly like real weights. Same seed, same bytes.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import string
import tempfile
from pathlib import Path

import torch

from .safety import checker_class

ARCH = Path(__file__).parent / "arch"
TEXT_DIM = 32  # tiny T5 d_model
CLIP_DIM = 32  # tiny CLIP text width (the x4 upscaler's cross-attention dim)
WORDS = ("a an the of in on at with and photo picture painting drawing portrait landscape city street house "
         "forest mountain river sea ocean beach sky sun moon night day red blue green yellow orange purple black "
         "white small big old young cat dog bird horse fish man woman child people tree flower car boat robot "
         "castle garden field snow rain light dark style oil watercolor digital art detailed realistic "
         "cinematic wearing holding standing sitting under over near by sign says very deep learning").split()


def arch(name: str) -> dict:
    cfg = json.loads((ARCH / f"{name}.json").read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _tiny_unet(cfg: dict, cross_dim: int, text_dim: int | None, sample_size: int) -> dict:
    cfg = copy.deepcopy(cfg)
    n = len(cfg["block_out_channels"])
    cfg.update(block_out_channels=[32] * n, layers_per_block=1, norm_num_groups=8, sample_size=sample_size,
               cross_attention_dim=cross_dim)
    if cfg.get("encoder_hid_dim"):
        cfg["encoder_hid_dim"] = text_dim
    if cfg.get("addition_embed_type_num_heads"):
        cfg["addition_embed_type_num_heads"] = 2
    if cfg.get("time_embedding_dim"):
        cfg["time_embedding_dim"] = 32
    cfg["attention_head_dim"] = 8 if cfg.get("encoder_hid_dim") else 2
    return cfg


def _t5_tokenizer():
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -3.0) for w in WORDS]
    vocab += [(c, -6.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=77)


def _clip_tokenizer():
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + alphabet + [c + "</w>" for c in alphabet]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def _seeded(seed: int, salt: int):
    torch.manual_seed(seed * 1000 + salt)


def _components(seed: int) -> dict[str, object]:
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deepfloyd_if import IFWatermarker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    t5 = arch("google-t5-v1_1-xxl_config")
    t5.update(d_model=TEXT_DIM, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
              vocab_size=len(_t5_tokenizer()))
    _seeded(seed, 1)
    text_encoder = T5EncoderModel(T5Config(**t5)).eval()
    _seeded(seed, 2)
    unet_1 = UNet2DConditionModel.from_config(_tiny_unet(arch("IF-I-XL-v1.0_unet"), 32, TEXT_DIM, 16))
    _seeded(seed, 3)
    unet_2 = UNet2DConditionModel.from_config(_tiny_unet(arch("IF-II-L-v1.0_unet"), 32, TEXT_DIM, 64))
    _seeded(seed, 4)
    unet_3 = UNet2DConditionModel.from_config(_tiny_unet(arch("sd-x4-upscaler_unet"), CLIP_DIM, None, 64))
    vae_cfg = arch("sd-x4-upscaler_vae")
    vae_cfg.update(block_out_channels=[32, 32, 32], layers_per_block=1, norm_num_groups=8, sample_size=64)
    _seeded(seed, 5)
    vae = AutoencoderKL.from_config(vae_cfg)
    _seeded(seed, 6)
    clip_text = CLIPTextModel(CLIPTextConfig(hidden_size=CLIP_DIM, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, max_position_embeddings=77,
                                             vocab_size=len(_clip_tokenizer()), hidden_act="gelu",
                                             projection_dim=16, bos_token_id=0, eos_token_id=1,
                                             pad_token_id=1)).eval()
    _seeded(seed, 7)
    safety = checker_class()(CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=16),
        projection_dim=16)).eval()
    _seeded(seed, 8)
    watermarker = IFWatermarker()
    mark = torch.rand(62, 62, 4) * 255
    mark[..., 3] = 128.0
    watermarker.watermark_image.copy_(mark.round())
    return dict(
        t5_tokenizer=_t5_tokenizer(), text_encoder=text_encoder, unet_1=unet_1, unet_2=unet_2, unet_3=unet_3,
        vae=vae, clip_text=clip_text, clip_tokenizer=_clip_tokenizer(), safety_checker=safety,
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        watermarker=watermarker,
        scheduler_1=DDPMScheduler.from_config(arch("IF-I_scheduler")),
        scheduler_2=DDPMScheduler.from_config(arch("IF-II_scheduler")),
        noising_2=DDPMScheduler.from_config(arch("IF-II_image_noising_scheduler")),
        scheduler_3=DDIMScheduler.from_config(arch("sd-x4-upscaler_scheduler")),
        low_res_3=DDPMScheduler.from_config(arch("sd-x4-upscaler_low_res_scheduler")),
    )


def build_tiny_cascade(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Write IF-I/, IF-II/ and x4-upscaler/ under `directory` (atomically: a half-built cascade never appears)."""
    from diffusers import IFPipeline, IFSuperResolutionPipeline, StableDiffusionUpscalePipeline

    target = Path(os.path.expanduser(str(directory)))
    target.parent.mkdir(parents=True, exist_ok=True)
    c = _components(seed)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        IFPipeline(tokenizer=c["t5_tokenizer"], text_encoder=c["text_encoder"], unet=c["unet_1"],
                   scheduler=c["scheduler_1"], safety_checker=c["safety_checker"],
                   feature_extractor=c["feature_extractor"], watermarker=c["watermarker"],
                   requires_safety_checker=True).save_pretrained(f"{tmp}/IF-I")
        IFSuperResolutionPipeline(tokenizer=None, text_encoder=None, unet=c["unet_2"], scheduler=c["scheduler_2"],
                                  image_noising_scheduler=c["noising_2"], safety_checker=None,
                                  feature_extractor=None, watermarker=None,
                                  requires_safety_checker=False).save_pretrained(f"{tmp}/IF-II")
        StableDiffusionUpscalePipeline(vae=c["vae"], text_encoder=c["clip_text"], tokenizer=c["clip_tokenizer"],
                                       unet=c["unet_3"], low_res_scheduler=c["low_res_3"], scheduler=c["scheduler_3"],
                                       max_noise_level=350).save_pretrained(f"{tmp}/x4-upscaler")
        (Path(tmp) / "TINY_CASCADE.json").write_text(json.dumps({"seed": seed, "format": 1}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        os.makedirs(tmp)  # TemporaryDirectory cleans up a path that must exist
    return target


def ensure_tiny_cascade(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Build the cascade unless `directory` already holds one made from the same seed."""
    target = Path(os.path.expanduser(str(directory)))
    marker = target / "TINY_CASCADE.json"
    if marker.is_file() and json.loads(marker.read_text()).get("seed") == seed:
        return target
    return build_tiny_cascade(target, seed)
