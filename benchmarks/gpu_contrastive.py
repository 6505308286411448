"""Time the contrastive loss on a CUDA GPU (bf16, world 1, b = N): Triton vs ClipLoss vs inf-cl.

Run from the repository root: `python benchmarks/gpu_contrastive.py [--sizes 4096 ... --dims 512 1024]
[--output BENCHMARKS.md]` (`--smoke`: tiny sizes on a CPU, to check the script). Each run appends one
Markdown section (device, date, command, one row per N, D and implementation, written as measured) to the
output file: forward and fwd+bwd milliseconds (median of CUDA-event timed repeats for up to
`--repeat_budget_s` seconds each), peak memory of one fwd+bwd step above the inputs,
the loss difference to ClipLoss where that fits, the Triton backward's bitwise repeatability, and a profile of
ClipLoss's and Triton's step at the smallest size up to PROFILE_MAX_N (GPU kernels per step and the time
they keep the GPU busy).
ClipLoss is skipped where its N x N logits would not fit; inf-cl is timed only when `import inf_cl`
works. `triton_fused_bwd` times the in-kernel backward (fp16's) in place of bf16's cuBLAS one, and
`triton_striped_bwd` the cuBLAS one on stripes (each direction rebuilding its tiles) in place of all rows at
once, up to FUSED_BACKWARD_MAX_N, `torch_tiled` (the same tiled algorithm in torch, fp32 cuBLAS GEMMs on 2048-row tiles)
up to its TORCH_TILED_MAX_N; `--tiles 128x64x32 ...` also times the Triton loss with other tile shapes.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import traceback
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_contrastive import IMPLEMENTATIONS, cal_inf_loss, fits, make_inputs  # noqa: E402
from benchmarks.gpu_runs import (MarkdownSection, benchmark_device, device_label, median_ms,  # noqa: E402
                                 profile_gpu_kernels, release_memory)
from benchmarks.memory import peak_memory_bytes  # noqa: E402
from kernels.contrastive.function import ContrastiveLossFunction  # noqa: E402
from kernels.contrastive.launch import TritonTiles  # noqa: E402

DTYPE = torch.bfloat16
SIZES = (4096, 16384, 65536, 262144, 1048576)
DIMS = (512, 1024)
SMOKE_SIZES, SMOKE_DIMS = (48,), (40,)
# ClipLoss holds two N x N logits, their softmax and gradients: ~5 * N^2 * 2 bytes in bf16
CLIP_LOSS_BYTES_PER_PAIR = 10
# The accuracy reference: ClipLoss on the same inputs upcast to fp32, forward only (two N x N fp32 logits
# and their softmax). Not the bf16 ClipLoss: its bf16 logits, up to the scale of 100, are rounded by up to 0.25.
REFERENCE_BYTES_PER_PAIR = 16
DETERMINISM_MAX_N = 65536
# The profile of the smallest step is taken up to this N, where ClipLoss fits on any GPU and a step takes milliseconds
PROFILE_MAX_N = 16384
COLUMNS = ("N", "D", "impl", "fwd ms", "fwd+bwd ms", "peak MiB", "fwd+bwd vs ClipLoss", "loss diff vs fp32 ClipLoss")


def triton_with_tiles(tiles: TritonTiles) -> Callable[..., torch.Tensor]:
    """The Triton loss with fixed tiles (`--tiles`), to compare tile shapes on one GPU in one run."""
    def loss(images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        return ContrastiveLossFunction.apply(images, texts, logit_scale, None, None, tiles)  # unmasked, as the API
    return loss


def tile_shape(text: str) -> tuple[int, int, int]:
    """'128x64x64' -> (BLOCK_M, BLOCK_N, BLOCK_K); powers of two >= 16, as the launcher requires."""
    try:
        shape = tuple(int(part) for part in text.split("x"))
        if len(shape) != 3:
            raise ValueError
        TritonTiles(*shape)
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected MxNxK with powers of two >= 16, e.g. 128x64x64")
    return shape


def triton_striped_backward(images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """The Triton loss with its cuBLAS backward forced onto 4 stripes per direction (5 GEMMs per tile), the path
    beyond WHOLE_GRAD_LOGITS_BUDGET_BYTES, where the default takes all of d(loss)/d(dot) at once (4 GEMMs)."""
    tiles = TritonTiles(stripe=max(1, images.shape[0] // 4))
    return ContrastiveLossFunction.apply(images, texts, logit_scale, None, None, tiles)


# bf16's backward multiplies d(loss)/d(dot) by the features in cuBLAS; the fused kernel (fp16's) and the striped
# cuBLAS path are timed beside it
LOSSES = {**IMPLEMENTATIONS, "triton_fused_bwd": triton_with_tiles(TritonTiles(fused_backward=True)),
          "triton_striped_bwd": triton_striped_backward}
FUSED_BACKWARD_MAX_N = 65536  # beyond, seconds per step for paths bf16 does not take there


def measure(name: str, rows: int, dim: int, device: torch.device, repeat_budget_s: float) -> dict[str, float]:
    """The loss comes from the forward timing's warm-up, and the peak memory step is the fwd+bwd timing's warm-up:
    at N = 1M each call takes seconds, so none is made only for them."""
    loss_fn = LOSSES[name]
    images, texts, logit_scale = make_inputs(rows, dim, device, DTYPE)
    images.requires_grad_()
    texts.requires_grad_()
    losses: list[torch.Tensor] = []

    def forward() -> None:
        with torch.no_grad():
            losses.append(loss_fn(images, texts, logit_scale))

    def forward_backward() -> None:
        loss_fn(images, texts, logit_scale).backward()
        images.grad = texts.grad = logit_scale.grad = None

    forward_ms = median_ms(forward, device, repeat_budget_s)
    peak_bytes = peak_memory_bytes(forward_backward, device)
    return {"loss": losses[0].item(), "forward_ms": forward_ms, "peak_bytes": peak_bytes,
            "step_ms": median_ms(forward_backward, device, repeat_budget_s, warm_up=False)}


def reference_loss(rows: int, dim: int, device: torch.device) -> float:
    images, texts, logit_scale = make_inputs(rows, dim, device, DTYPE)
    with torch.no_grad():
        return IMPLEMENTATIONS["open_clip"](images.float(), texts.float(), logit_scale).item()


def triton_is_deterministic(rows: int, dim: int, device: torch.device) -> bool:
    images, texts, logit_scale = make_inputs(rows, dim, device, DTYPE)
    grads = []
    for _ in range(2):
        leaf_images, leaf_texts = images.detach().requires_grad_(), texts.detach().requires_grad_()
        IMPLEMENTATIONS["triton"](leaf_images, leaf_texts, logit_scale).backward()
        grads.append((leaf_images.grad, leaf_texts.grad))
    return all(torch.equal(a, b) for a, b in zip(*grads))


def sweep(sizes: list[int], dims: list[int], device: torch.device, repeat_budget_s: float,
          section: MarkdownSection, tile_variants: tuple[str, ...] = (), failed: list[str] | None = None) -> bool:
    """Writes a row per size and implementation (ClipLoss first: the others' speed-up is against it);
    returns whether the Triton backward repeated bitwise. An implementation that raises gets an error row (its
    traceback printed, its name added to `failed`) and the sweep goes on: on the first H100 run inf-cl's fault
    ended the script at its first size."""
    free_bytes = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else float("inf")
    for dim in dims:
        for rows in sizes:
            clip_loss_fits = CLIP_LOSS_BYTES_PER_PAIR * rows * rows <= 0.8 * free_bytes
            names = ((["open_clip"] if clip_loss_fits else []) + ["triton"]
                     + (["triton_fused_bwd", "triton_striped_bwd"] if rows <= FUSED_BACKWARD_MAX_N else [])
                     + list(tile_variants)
                     + (["torch_tiled"] if fits("torch_tiled", rows) else [])
                     + (["inf_cl"] if cal_inf_loss is not None else []))
            reference = (reference_loss(rows, dim, device) if REFERENCE_BYTES_PER_PAIR * rows * rows < 0.8 * free_bytes
                         else None)
            baseline = None
            for name in names:
                outcome = "OOM"
                try:
                    result = measure(name, rows, dim, device, repeat_budget_s)
                except torch.cuda.OutOfMemoryError:
                    result = None
                except Exception as error:  # noqa: BLE001 - one implementation's fault must not end the sweep
                    traceback.print_exc()
                    result, outcome = None, f"error: {type(error).__name__}"
                    if failed is not None:
                        failed.append(f"{name} at N = {rows}, D = {dim}")
                release_memory(device)
                if result is None:
                    section.row([str(rows), str(dim), name, outcome, outcome, "-", "-", "-"])
                    continue
                baseline = result if name == "open_clip" else baseline
                speedup = f"{baseline['step_ms'] / result['step_ms']:.2f}x" if baseline else "-"
                diff = f"{abs(result['loss'] - reference):.2e}" if reference is not None else "-"
                section.row([str(rows), str(dim), name, f"{result['forward_ms']:.2f}", f"{result['step_ms']:.2f}",
                             f"{result['peak_bytes'] / 2**20:.0f}", speedup, diff])
    # bitwise repeatability at the smallest size, capped: at N = 1M the check alone is two 4.5 PFLOP steps
    return triton_is_deterministic(min(min(sizes), DETERMINISM_MAX_N), dims[0], device)


def kernel_profile(name: str, rows: int, dim: int, device: torch.device) -> str:
    """`profile_gpu_kernels` of one forward+backward of `name`: kernel-bound, or waiting on launches."""
    loss_fn = LOSSES[name]
    images, texts, logit_scale = make_inputs(rows, dim, device, DTYPE)
    images.requires_grad_()
    texts.requires_grad_()

    def forward_backward() -> None:
        loss_fn(images, texts, logit_scale).backward()
        images.grad = texts.grad = None

    return f"{name} at N = {rows}, D = {dim}: " + profile_gpu_kernels(forward_backward, device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="global batch sizes N")
    parser.add_argument("--dims", type=int, nargs="+", default=list(DIMS), help="feature dimensions D")
    parser.add_argument("--repeat_budget_s", type=float, default=20.0,
                        help="seconds of timed repeats per measurement (at least one, after a warm-up)")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    parser.add_argument("--smoke", action="store_true", help="one tiny size, on a CPU if there is no GPU")
    parser.add_argument("--tiles", type=tile_shape, nargs="+", default=[],
                        help="also time the Triton loss with these tiles, MxNxK (e.g. 128x64x64), at every size")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    device = benchmark_device("gpu_contrastive.py", args.smoke)
    sizes, dims = (list(SMOKE_SIZES), list(SMOKE_DIMS)) if args.smoke else (args.sizes, args.dims)
    section = MarkdownSection(
        args.output, f"## contrastive_loss (Triton) vs open_clip ClipLoss / inf-cl, {device_label(device)}, "
                     f"{datetime.date.today().isoformat()}",
        f"Command: `python {' '.join(sys.argv)}`; dtype {str(DTYPE).removeprefix('torch.')}; world size 1 (b = N), "
        f"logit scale 100; torch {torch.__version__}; inf-cl {'installed' if cal_inf_loss else 'not installed'}. "
        "Times are medians of CUDA-event timed repeats; peak memory is one fwd+bwd step above the inputs.",
        COLUMNS)
    repeat_budget_s = 0.0 if args.smoke else args.repeat_budget_s  # smoke checks the script: one timed repeat
    tile_variants = []
    for shape in args.tiles:
        name = "triton_" + "x".join(map(str, shape))
        LOSSES[name] = triton_with_tiles(TritonTiles(*shape))
        tile_variants.append(name)
    failed: list[str] = []
    deterministic = sweep(sizes, dims, device, repeat_budget_s, section, tuple(tile_variants), failed)
    section.note(f"Triton backward bitwise repeatable: {'yes' if deterministic else 'NO'}.")
    if min(sizes) <= PROFILE_MAX_N:  # where the smallest step's time goes: kernels, or launching them
        for name in ("open_clip", "triton"):
            section.note("Profile: " + kernel_profile(name, min(sizes), dims[0], device))
    if failed:  # the rows above stand; the session's steps.md says this step failed
        sys.exit("failed (tracebacks above): " + "; ".join(failed))


if __name__ == "__main__":
    main()
