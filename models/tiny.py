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

from .quiet import quiet_progress_bars
from .safety import checker_class

ARCH = Path(__file__).parent / "arch"
TEXT_DIM = 32  # tiny T5 d_model
CLIP_DIM = 32  # tiny CLIP text width (the x4 upscaler's cross-attention dim)
WORDS = (
    "a an the of in on at with and photo picture painting drawing portrait landscape city street house "
    "forest mountain river sea ocean beach sky sun moon night day red blue green yellow orange purple black "
    "white small big old young cat dog bird horse fish man woman child people tree flower car boat robot "
    "castle garden field snow rain light dark style oil watercolor digital art detailed realistic "
    "cinematic wearing holding standing sitting under over near by sign says very deep learning"
).split()


def arch(name: str) -> dict:
    cfg = json.loads((ARCH / f"{name}.json").read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _tiny_unet(cfg: dict, cross_dim: int, text_dim: int | None, sample_size: int) -> dict:
    cfg = copy.deepcopy(cfg)
    n = len(cfg["block_out_channels"])
    cfg.update(
        block_out_channels=[32] * n,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=sample_size,
        cross_attention_dim=cross_dim,
    )
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


def _sizes(real_size: bool) -> dict[str, dict]:
    """Architectures: the real ones from `arch/` (for GPU benchmarks), or their narrow tiny forms."""
    t5 = arch("google-t5-v1_1-xxl_config")
    u1, u2, u3, vae = (
        arch("IF-I-XL-v1.0_unet"),
        arch("IF-II-L-v1.0_unet"),
        arch("sd-x4-upscaler_unet"),
        arch("sd-x4-upscaler_vae"),
    )
    if real_size:  # the x4 upscaler's OpenCLIP ViT-H text tower; IF's safety checker is CLIP ViT-L/14
        clip = dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            vocab_size=49408,
            projection_dim=512,
        )
        vision = dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            projection_dim=768,
        )
        return dict(t5=t5, unet_1=u1, unet_2=u2, unet_3=u3, vae=vae, clip=clip, vision=vision, image_size=224)
    t5.update(
        d_model=TEXT_DIM,
        d_ff=64,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        num_decoder_layers=2,
        vocab_size=len(_t5_tokenizer()),
    )
    vae.update(block_out_channels=[32, 32, 32], layers_per_block=1, norm_num_groups=8, sample_size=64)
    clip = dict(
        hidden_size=CLIP_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=len(_clip_tokenizer()),
        projection_dim=16,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    return dict(
        t5=t5,
        unet_1=_tiny_unet(u1, 32, TEXT_DIM, 16),
        unet_2=_tiny_unet(u2, 32, TEXT_DIM, 64),
        unet_3=_tiny_unet(u3, CLIP_DIM, None, 64),
        vae=vae,
        clip=clip,
        vision=vision,
        image_size=32,
    )


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast freshly built weights. torch's own `to`: diffusers' override warns about modules to keep in float32,
    which a model built from a config does not have (its list is empty)."""
    return torch.nn.Module.to(module, dtype)


def random_components(
    seed: int, real_size: bool = False, device: str = "cpu", dtypes: dict[str, torch.dtype] | None = None
) -> dict[str, object]:
    """Every component of the cascade with seeded random weights, built directly on `device`.

    `dtypes` maps "text_encoder", "stage_1", "stage_2", "stage_3" to the dtype each is cast to (default fp32).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deepfloyd_if import IFWatermarker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    dt = {k: torch.float32 for k in ("text_encoder", "stage_1", "stage_2", "stage_3")} | (dtypes or {})
    z = _sizes(real_size)
    with torch.device(device):
        _seeded(seed, 1)
        text_encoder = _cast(T5EncoderModel(T5Config(**z["t5"])), dt["text_encoder"]).eval()
        _seeded(seed, 2)
        unet_1 = _cast(UNet2DConditionModel.from_config(z["unet_1"]), dt["stage_1"])
        _seeded(seed, 3)
        unet_2 = _cast(UNet2DConditionModel.from_config(z["unet_2"]), dt["stage_2"])
        _seeded(seed, 4)
        unet_3 = _cast(UNet2DConditionModel.from_config(z["unet_3"]), dt["stage_3"])
        _seeded(seed, 5)
        vae = _cast(AutoencoderKL.from_config(z["vae"]), dt["stage_3"])
        _seeded(seed, 6)
        clip_text = CLIPTextModel(
            CLIPTextConfig(
                max_position_embeddings=77,
                hidden_act="gelu",
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
                **z["clip"],
            )
        )
        clip_text = _cast(clip_text, dt["stage_3"]).eval()
        _seeded(seed, 7)
        safety = checker_class()(
            CLIPConfig(
                text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
                vision_config=z["vision"],
                projection_dim=z["vision"]["projection_dim"],
            )
        ).eval()
    _seeded(seed, 8)
    watermarker = IFWatermarker()
    mark = torch.rand(62, 62, 4) * 255
    mark[..., 3] = 128.0
    watermarker.watermark_image.copy_(mark.round())
    size = z["image_size"]
    return dict(
        t5_tokenizer=_t5_tokenizer(),
        text_encoder=text_encoder,
        unet_1=unet_1,
        unet_2=unet_2,
        unet_3=unet_3,
        vae=vae,
        clip_text=clip_text,
        clip_tokenizer=_clip_tokenizer(),
        safety_checker=safety,
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        watermarker=watermarker,
        scheduler_1=DDPMScheduler.from_config(arch("IF-I_scheduler")),
        scheduler_2=DDPMScheduler.from_config(arch("IF-II_scheduler")),
        noising_2=DDPMScheduler.from_config(arch("IF-II_image_noising_scheduler")),
        scheduler_3=DDIMScheduler.from_config(arch("sd-x4-upscaler_scheduler")),
        low_res_3=DDPMScheduler.from_config(arch("sd-x4-upscaler_low_res_scheduler")),
    )


def pipelines(c: dict[str, object]) -> dict[str, object]:
    """Assemble the three diffusers pipelines the way the hub repos hold them."""
    from diffusers import IFPipeline, IFSuperResolutionPipeline, StableDiffusionUpscalePipeline

    return {
        "IF-I": IFPipeline(
            tokenizer=c["t5_tokenizer"],
            text_encoder=c["text_encoder"],
            unet=c["unet_1"],
            scheduler=c["scheduler_1"],
            safety_checker=c["safety_checker"],
            feature_extractor=c["feature_extractor"],
            watermarker=c["watermarker"],
            requires_safety_checker=True,
        ),
        "IF-II": IFSuperResolutionPipeline(
            tokenizer=None,
            text_encoder=None,
            unet=c["unet_2"],
            scheduler=c["scheduler_2"],
            image_noising_scheduler=c["noising_2"],
            safety_checker=None,
            feature_extractor=None,
            watermarker=None,
            requires_safety_checker=False,
        ),
        "x4-upscaler": StableDiffusionUpscalePipeline(
            vae=c["vae"],
            text_encoder=c["clip_text"],
            tokenizer=c["clip_tokenizer"],
            unet=c["unet_3"],
            low_res_scheduler=c["low_res_3"],
            scheduler=c["scheduler_3"],
            max_noise_level=350,
        ),
    }


# What a built cascade holds; a cache of another format is built again (2: the scorer's clip/; 3: IF-I's
# model_index.json names the safety checker as the hub repos do)
TINY_FORMAT = 3


def _as_hub_repo(folder: Path) -> None:
    """IF-I's model_index.json names its safety checker as the DeepFloyd repos do (diffusers' IFSafetyChecker), not
    the subclass that built it (safety.checker_class): then the model card's `DiffusionPipeline.from_pretrained`
    reads the folder as it reads the hub's."""
    index = folder / "model_index.json"
    spec = json.loads(index.read_text())
    spec["safety_checker"] = ["deepfloyd_if", "IFSafetyChecker"]
    index.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    config = folder / "safety_checker" / "config.json"
    spec = json.loads(config.read_text())
    spec["architectures"] = ["IFSafetyChecker"]
    config.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")


def build_tiny_cascade(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Write IF-I/, IF-II/, x4-upscaler/ and the scorer's clip/ under `directory` (atomically: a half-built cascade
    never appears)."""
    target = Path(os.path.expanduser(str(directory)))
    target.parent.mkdir(parents=True, exist_ok=True)
    quiet_progress_bars()  # no "Writing model shards" bars
    pipes = pipelines(random_components(seed))
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        for name, pipe in pipes.items():
            pipe.save_pretrained(f"{tmp}/{name}")
        _as_hub_repo(Path(tmp) / "IF-I")
        build_tiny_clip(Path(tmp) / "clip", seed)
        (Path(tmp) / "TINY_CASCADE.json").write_text(json.dumps({"seed": seed, "format": TINY_FORMAT}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        os.makedirs(tmp)  # TemporaryDirectory cleans up a path that must exist
    return target


def tiny_ready(directory: str | os.PathLike, seed: int = 0) -> bool:
    """Whether `directory` already holds a cascade built from `seed`."""
    marker = Path(os.path.expanduser(str(directory))) / "TINY_CASCADE.json"
    if not marker.is_file():
        return False
    made = json.loads(marker.read_text())
    return made.get("seed") == seed and made.get("format") == TINY_FORMAT


def ensure_tiny_cascade(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Build the cascade unless `directory` already holds one made from the same seed."""
    if tiny_ready(directory, seed):
        return Path(os.path.expanduser(str(directory)))
    return build_tiny_cascade(directory, seed)


def build_tiny_clip(directory: str | os.PathLike, seed: int = 0) -> Path:
    """A seeded random-weight CLIP (CLIPModel + CLIPProcessor, 64 px images, the tiny cascade's CLIP tokenizer),
    saved like a hub repo and loaded back through models.loading like real weights. Same seed, same bytes."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    target = Path(os.path.expanduser(str(directory)))
    target.parent.mkdir(parents=True, exist_ok=True)
    quiet_progress_bars()
    tokenizer = _clip_tokenizer()
    small = dict(hidden_size=CLIP_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            **small,
        ),
        vision_config=dict(image_size=64, patch_size=16, **small),
        projection_dim=16,
    )
    _seeded(seed, 7)
    model = CLIPModel(config).eval()
    images = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        model.save_pretrained(tmp)
        CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        os.makedirs(tmp)
    return target
