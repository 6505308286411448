"""FineCLIP training steps on one CUDA GPU (bf16): samples/s, model TFLOPs, MFU and peak memory for
ViT-B/16 and ViT-L/14 at 224 px, per attention backend, with and without activation checkpointing.

Run from the repository root: `python benchmarks/gpu_training_step.py [--output BENCHMARKS.md]`
(`--smoke`: a tiny model on a CPU, to check the script; `--models ViT-L-14:32 --attention sdpa
--checkpointing off` picks settings). Appends one Markdown section (device, date, command, one row per
setting, written as measured). The step is the full
FineCLIP objective (L_GC + L_SD + L_RC, crops through the trainable tower, text tower frozen) with
AdamW on bf16 weights, no DeepSpeed: it measures the model, not the sharding. Target (issue 7):
ViT-L/14 at 224 at >= 40% MFU on an H100. ViT-bigG/14 with ZeRO-3 + checkpointing is a real run:
`deepspeed launch/pretrain.py --recipe vit-bigg-14 --deepspeed_config ds_configs/zero3_vit_bigg.json
--set data.source=synthetic --set data.world_image_size=224 --max_steps 20` (its summary.json has MFU).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_runs import MarkdownSection, benchmark_device, device_label, release_memory, synchronize  # noqa: E402
from fineclip_ds.config import KernelConfig, LossConfig, ModelConfig  # noqa: E402
from fineclip_ds.losses.objective import FineCLIPObjective  # noqa: E402
from fineclip_ds.models.factory import create_fineclip  # noqa: E402
from fineclip_ds.models.flops import FineCLIPShapes, step_flops  # noqa: E402
from fineclip_ds.training.metrics import peak_tflops  # noqa: E402

MODELS = (("ViT-B-16", 64), ("ViT-L-14", 32))  # model name, images per step
SMOKE_MODELS = (("FineCLIP-ViT-T-16-224", 2),)
CHECKPOINTING = {"off": False, "on": True}
BOXES = 5
COLUMNS = ("model", "attention", "checkpointing", "batch", "samples/s", "model TFLOP/s", "MFU", "peak GiB")


def synthetic_batch(tokenizer, images: int, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    corners = torch.rand(images, BOXES, 2, generator=generator) * size * 0.6
    extent = 16 + torch.rand(images, BOXES, 2, generator=generator) * size * 0.4
    boxes = torch.cat([corners, (corners + extent).clamp(max=size)], dim=-1)
    return {
        "images": torch.randn(images, 3, size, size, generator=generator).to(device, torch.bfloat16),
        "texts": tokenizer(["a photo of a cat and a dog"] * images).to(device),
        "boxes": boxes.to(device),
        "box_mask": torch.ones(images, BOXES, dtype=torch.bool, device=device),
        "region_texts": tokenizer(["a cat"] * images * BOXES).view(images, BOXES, -1).to(device),
    }


def measure(name: str, images: int, attention: str, checkpointing: bool, steps: int,
            device: torch.device) -> dict[str, float]:
    model, tokenizer, _ = create_fineclip(ModelConfig(name=name, attention=attention, grad_checkpointing=checkpointing))
    model = model.to(device, torch.bfloat16).train()
    objective = FineCLIPObjective(model, LossConfig(), KernelConfig())
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-5,
                                  fused=device.type == "cuda")
    batch = synthetic_batch(tokenizer, images, model.image_size[0], device)

    def step() -> None:
        total, _ = objective(batch)
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - started) / steps
    flops = step_flops(FineCLIPShapes.of(model.clip), images, images * BOXES, images * BOXES, 1, False, True,
                       objective.weights)
    tflops = flops / seconds / 1e12
    peak = peak_tflops(device_label(device))
    peak_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    return {"samples/s": images / seconds, "model TFLOP/s": tflops, "MFU": tflops / peak if peak else float("nan"),
            "peak GiB": peak_bytes / 2**30}


def model_and_batch(spec: str) -> tuple[str, int]:
    """'ViT-L-14:32' -> ('ViT-L-14', 32)."""
    name, _, images = spec.rpartition(":")
    if not name or not images.isdigit() or int(images) < 1:
        raise argparse.ArgumentTypeError(f"got {spec!r}, expected MODEL:IMAGES such as ViT-L-14:32")
    return name, int(images)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--models", type=model_and_batch, nargs="+", default=None,
                        help=f"MODEL:IMAGES per step (default: {' '.join(f'{n}:{i}' for n, i in MODELS)})")
    parser.add_argument("--attention", nargs="+", choices=("sdpa", "math", "flash_attn"), default=None,
                        help="attention backends (default: sdpa, math, and flash_attn when installed)")
    parser.add_argument("--checkpointing", nargs="+", choices=tuple(CHECKPOINTING), default=list(CHECKPOINTING))
    parser.add_argument("--smoke", action="store_true", help="a tiny model for one step, on a CPU if there is no GPU")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    device = benchmark_device("gpu_training_step.py", args.smoke)
    steps = 1 if args.smoke else args.steps
    flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    backends = args.attention or ["sdpa", "math"] + (["flash_attn"] if flash else [])
    models = SMOKE_MODELS if args.smoke else args.models or MODELS
    section = MarkdownSection(
        args.output, f"## FineCLIP training step, {device_label(device)}, {datetime.date.today().isoformat()}",
        f"`python {' '.join(sys.argv)}`; bf16 weights, AdamW, {steps} timed steps, {BOXES} boxes per image, "
        f"text tower frozen.", COLUMNS)
    for name, images in models:
        for attention in backends:
            for checkpointing in args.checkpointing:
                try:
                    row = measure(name, images, attention, CHECKPOINTING[checkpointing], steps, device)
                    cells = [f"{row[c]:.1f}" if c != "MFU" else f"{100 * row[c]:.1f}%" for c in COLUMNS[4:]]
                except torch.OutOfMemoryError:
                    cells = ["out of memory"] + [""] * (len(COLUMNS) - 5)
                release_memory(device)
                section.row([name, attention, str(CHECKPOINTING[checkpointing]), str(images), *cells])


if __name__ == "__main__":
    main()
