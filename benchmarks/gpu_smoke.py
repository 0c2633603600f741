"""GPU smoke benchmark: the real-size IF cascade, random weights, pushed through ifbatch's own stage runners.

Real-size architectures (models/arch/, the same files as ../shared/reference/configs) cost the same with
random weights as with real ones. For each batch size: warm-up at 2 steps, then one timed pass at the
if-xl preset's defaults (100/50/75 steps, guidance 7/4/9, noise 250/100, fp16); prints seconds per image
and peak GPU memory per stage, and writes the table (with the card's name and the date) to --out.

    python benchmarks/gpu_smoke.py                 # on a CUDA machine (CI never runs it)
    python benchmarks/gpu_smoke.py --tiny          # the same code on the tiny cascade, on the CPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from dataclasses import replace

import torch

from ifbatch.configs import load_config
from ifbatch.configs.schema import CASCADE
from ifbatch.models.encode import TextEncoder
from ifbatch.models.loading import torch_dtype
from ifbatch.models.params import StageParams
from ifbatch.models.safety import Safety
from ifbatch.models.stage_1 import Stage1
from ifbatch.models.stage_2 import Stage2
from ifbatch.models.stage_3 import Stage3
from ifbatch.models.tiny import pipelines, random_components

PROMPTS = [
    "a photo of a kangaroo wearing an orange hoodie and blue sunglasses in front of the eiffel tower",
    "an oil painting of a lighthouse on a cliff at dawn",
    "a macro photo of a dew drop on a leaf",
    "a watercolor of a fox in the snow",
    "a neon-lit street in tokyo at night, rain, cinematic",
    "a bowl of ramen, studio lighting",
    "an isometric drawing of a tiny castle",
    "a red vintage car on a beach",
]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny cascade on the CPU, to check the script")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--out", default=None, help="markdown file to append the table to (default: print only)")
    return p.parse_args()


class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t
        self.peak_gb = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else float("nan")


def main() -> None:
    args = parse()
    cfg = load_config("tiny" if args.tiny else "if-xl", ["device=cpu"] if args.tiny else ["device=cuda"])
    device = torch.device(cfg.device)
    dtypes = {k: torch_dtype(getattr(cfg, k).dtype) for k in CASCADE}
    t0 = time.perf_counter()
    parts = random_components(0, real_size=not args.tiny, device=str(device), dtypes=dtypes)
    pipes = pipelines(parts)
    enc = TextEncoder(cfg.text_encoder, cfg.device, tokenizer=parts["t5_tokenizer"], model=parts["text_encoder"])
    s1 = Stage1(cfg.stage_1, cfg.device, pipe=pipes["IF-I"])
    s2 = Stage2(cfg.stage_2, cfg.device, pipe=pipes["IF-II"])
    s3 = Stage3(cfg.stage_3, cfg.device, pipe=pipes["x4-upscaler"])
    safety = Safety(cfg.safety, "", cfg.stage_3.dtype, cfg.device, parts=parts)
    build_s = time.perf_counter() - t0
    print(f"built in {build_s:.1f} s on {device}", flush=True)

    def run(b: int, steps: int | None) -> dict[str, dict]:
        """One pass at the preset's parameters, or at `steps` steps (the warm-up)."""
        p1, p2, p3 = (
            None if steps is None else replace(StageParams.of(s), steps=steps, timesteps=None)
            for s in (cfg.stage_1, cfg.stage_2, cfg.stage_3)
        )
        prompts, seeds = (PROMPTS * 8)[:b], list(range(b))
        res = {}
        try:
            with Clock(device) as c:
                e = enc.encode(prompts, [""] * b)
            res["text_encoder"] = c
            with Clock(device) as c:
                x1 = s1(e.prompt_embeds, e.negative_embeds, seeds, p1)
            res["stage_1"] = c
            with Clock(device) as c:
                x2 = s2(x1, e.prompt_embeds, e.negative_embeds, seeds, p2)
            res["stage_2"] = c
            with Clock(device) as c:
                safety(s3(x2, prompts, [""] * b, seeds, p3))
            res["stage_3+safety"] = c
        except torch.OutOfMemoryError as err:
            res["oom"] = str(err)[:160]
        return res

    rows = []
    for b in args.batches:
        run(b, 2)  # warm-up: kernels, allocator, cuDNN autotuning
        res = run(b, None)
        for stage, c in res.items():
            if stage == "oom":
                rows.append({"batch": b, "stage": "OOM", "s_per_image": None, "peak_gb": None, "note": c})
                continue
            rows.append({"batch": b, "stage": stage, "s_per_image": c.seconds / b, "peak_gb": c.peak_gb})
        total = sum(r["s_per_image"] for r in rows if r["batch"] == b and r["s_per_image"])
        rows.append({"batch": b, "stage": "all", "s_per_image": total, "peak_gb": None})
        print(json.dumps([r for r in rows if r["batch"] == b]), flush=True)

    name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU ({platform.processor() or 'cpu'}, {torch.get_num_threads()} threads)"
    )
    steps = f"{cfg.stage_1.steps}/{cfg.stage_2.steps}/{cfg.stage_3.steps}"
    lines = [
        f"### {name}, {dt.date.today().isoformat()}, {'tiny' if args.tiny else 'real-size'} cascade",
        "",
        f"torch {torch.__version__}; steps {steps}; dtypes "
        f"{'/'.join(getattr(cfg, k).dtype for k in CASCADE)}; "
        f"models built in {build_s:.0f} s. Command: `python benchmarks/gpu_smoke.py{' --tiny' if args.tiny else ''}`",
        "",
        "| batch | stage | s / image | peak GB |",
        "|---|---|---|---|",
    ]
    for r in rows:
        s = "-" if r["s_per_image"] is None else f"{r['s_per_image']:.3f}"
        g = "-" if r["peak_gb"] is None or r["peak_gb"] != r["peak_gb"] else f"{r['peak_gb']:.1f}"
        lines.append(f"| {r['batch']} | {r['stage']} | {s} | {g} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + table)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_smoke.json"), "w") as f:
            json.dump({"device": name, "rows": rows, "build_s": build_s}, f, indent=1)


if __name__ == "__main__":
    main()
