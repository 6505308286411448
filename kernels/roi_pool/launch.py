"""Launchers of the region-pooling kernels: output buffers, tile sizes and grids.

Tiles are powers of two of at least 16 (the `tl.dot` minimum), shrunk to the problem so that odd,
tiny test shapes waste little work under the CPU interpreter. The largest tiles are the biggest that
compile without register spills for sm_80 and sm_90 at 8 warps (`python -m kernels.codegen`, checked
in the tests; the earlier 64 x 64 x 128 forward at 4 warps spilled up to 7 KB per thread). Their speed
is not yet tuned on a GPU.
Normalised pooling is fused into the forward kernel unless that would leave most SMs idle (see
`normalize_in_second_pass`).
fp32 tokens use exact fp32 dots; half-precision tokens use TF32, whose 10-bit mantissa holds every
bf16/fp16 token exactly. The weights are truncated to TF32 (the tensor cores drop the low 13 bits: no
cvt.rna in the PTX), up to 2^-10 relative: below bf16's rounding of the output, about twice fp16's,
still inside the fp16 tolerance at the GPU test sizes.
Launches run on the tensors' device (`kernels.device.launch_device`), not merely the current one.
"""
from __future__ import annotations

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from kernels.device import launch_device, multiprocessor_count
from kernels.roi_pool import reference
from kernels.roi_pool.triton_kernels import region_factors_kernel, region_pool_bwd_kernel, region_pool_fwd_kernel

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# TRITON_INTERPRET=1 at import time runs the kernels on the CPU interpreter (the tests do this).
INTERPRETED = isinstance(region_pool_fwd_kernel, InterpretedFunction)


def runs_on(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of `device`: CUDA ones, or any under the interpreter."""
    return device.type == "cuda" or INTERPRETED


# Largest (regions, tokens, channels) tiles per pass, keyed by "tokens are fp32" (exact fp32 dots
# run on FMA units and need more registers than tf32 ones).
FORWARD_TILES = {False: (64, 32, 128), True: (64, 32, 64)}
BACKWARD_TILES = {False: (32, 64, 128), True: (32, 64, 64)}
NUM_WARPS = 8


def _tile(size: int, largest: int) -> int:
    return max(16, min(largest, triton.next_power_of_2(size)))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def region_factors(
    boxes: torch.Tensor,
    box_mask: torch.Tensor,
    grid_hw: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-box row factors (divided by the sample count) and column factors, zero for masked boxes."""
    # boxes: [B, R, 4] xyxy pixels; box_mask: [B, R] -> rows: [B, R, H], cols: [B, R, W] fp32
    batch, regions = boxes.shape[:2]
    height, width = grid_hw
    rows = boxes.new_empty(batch, regions, height, dtype=torch.float32)
    cols = boxes.new_empty(batch, regions, width, dtype=torch.float32)
    scaled = boxes.detach().double() * float(spatial_scale)  # fp64 as in the reference (see the kernel)
    with launch_device(boxes):
        region_factors_kernel[(batch * regions,)](
            scaled.contiguous(), box_mask.contiguous(), rows, cols, int(sampling_ratio), height, width,
            MAX_POINTS=reference.MAX_SAMPLES_PER_AXIS,
            BLOCK_H=triton.next_power_of_2(height), BLOCK_W=triton.next_power_of_2(width),
        )
    return rows, cols


def normalize_in_second_pass(box_programs: int, channel_tiles: int, multiprocessors: int | None) -> bool:
    """Whether normalised pooling should split channels over programs and normalise in a second pass.

    The fused kernel gives each program every channel of its boxes (the norm needs the whole row), so a
    32-image micro-batch with up to 64 boxes per image runs 32 programs: 100 of an H100's 132 SMs idle.
    Split, each channel tile gets its own program, like unnormalised pooling, and torch normalises
    the fp32 rows after. No SM count (the CPU interpreter) keeps the fused kernel."""
    return bool(multiprocessors) and channel_tiles > 1 and box_programs < multiprocessors


def picks_second_pass(tokens: torch.Tensor, regions: int) -> bool:
    """Whether `pool_forward` normalises `regions` boxes per image of `tokens` in a second pass by default."""
    # tokens: [B, H*W, C]
    largest_r, _, largest_c = FORWARD_TILES[tokens.dtype == torch.float32]
    box_programs = tokens.shape[0] * triton.cdiv(regions, _tile(regions, largest_r))
    channel_tiles = triton.cdiv(tokens.shape[-1], _tile(tokens.shape[-1], largest_c))
    return normalize_in_second_pass(box_programs, channel_tiles, multiprocessor_count(tokens, INTERPRETED))


def pool_forward(
    tokens: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, grid_hw: tuple[int, int], normalize: bool,
    second_pass: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pooled (optionally L2-normalised) box features, and the pre-normalisation norms when normalising.

    `second_pass` (read only when normalising) forces the split (True) or fused (False) normalisation;
    None: `picks_second_pass`. Both give the same outputs and norms for the backward.
    """
    # tokens: [B, H*W, C]; rows: [B, R, H]; cols: [B, R, W] -> out: [B, R, C], norms: [B, R] fp32 or None
    batch, regions = rows.shape[:2]
    channels = tokens.shape[-1]
    largest_r, largest_t, largest_c = FORWARD_TILES[tokens.dtype == torch.float32]
    block_r = _tile(regions, largest_r)
    block_c = _tile(channels, largest_c)
    second_pass = normalize and (picks_second_pass(tokens, regions) if second_pass is None else second_pass)
    fused = normalize and not second_pass
    # Normalised rows are pooled and rescaled in fp32 and rounded to the tokens' dtype once, at the end.
    out = tokens.new_empty(batch, regions, channels, dtype=torch.float32 if normalize else tokens.dtype)
    norms = rows.new_empty(batch, regions) if fused else None
    grid = (batch, triton.cdiv(regions, block_r), 1 if fused else triton.cdiv(channels, block_c))
    with launch_device(tokens):
        region_pool_fwd_kernel[grid](
            tokens, rows, cols, out, rows if norms is None else norms,
            regions, channels, *grid_hw,
            *tokens.stride(),
            reference.NORMALIZE_EPS,
            NORMALIZE=fused, DOT_PRECISION=_dot_precision(tokens.dtype),
            BLOCK_R=block_r, BLOCK_T=_tile(grid_hw[0] * grid_hw[1], largest_t), BLOCK_C=block_c, num_warps=NUM_WARPS,
        )
    if second_pass:
        norms = torch.linalg.vector_norm(out, dim=-1)
        out = out / norms.clamp_min(reference.NORMALIZE_EPS).unsqueeze(-1)
    return out.to(tokens.dtype), norms


def pool_backward(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    norms: torch.Tensor | None,
    rows: torch.Tensor,
    cols: torch.Tensor,
    grid_hw: tuple[int, int],
) -> torch.Tensor:
    """Gradient of the tokens, in the dtype of the pooled output, without atomics."""
    # grad_out, out: [B, R, C]; norms: [B, R] fp32 or None (no normalisation); rows/cols as above
    # -> grad_tokens: [B, H*W, C]
    batch, regions, channels = grad_out.shape
    n_tokens = grid_hw[0] * grid_hw[1]
    grad_tokens = out.new_empty(batch, n_tokens, channels)
    normalize = norms is not None
    row_dots = (grad_out.float() * out.float()).sum(-1) if normalize else rows
    largest_r, largest_t, largest_c = BACKWARD_TILES[out.dtype == torch.float32]
    block_t = _tile(n_tokens, largest_t)
    block_c = _tile(channels, largest_c)
    grid = (batch, triton.cdiv(n_tokens, block_t), triton.cdiv(channels, block_c))
    with launch_device(grad_tokens):
        region_pool_bwd_kernel[grid](
            grad_out, out, row_dots, rows if norms is None else norms, rows, cols, grad_tokens,
            regions, channels, *grid_hw,
            *grad_out.stride(),
            reference.NORMALIZE_EPS,
            NORMALIZE=normalize, DOT_PRECISION=_dot_precision(out.dtype),
            BLOCK_R=_tile(regions, largest_r), BLOCK_T=block_t, BLOCK_C=block_c, num_warps=NUM_WARPS,
        )
    return grad_tokens
