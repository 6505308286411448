"""Triton kernels of region pooling: per-box axis factors, the pooling forward, its deterministic backward.

The weight of token (h, w) for box r is `rows[r, h] * cols[r, w]` (see reference.py for why it
factorises). `region_factors_kernel` writes those factors ([B, R, H] + [B, R, W] fp32, about
(H + W) / (H * W) of the dense weight matrix); the pooling kernels rebuild each [regions x tokens]
weight tile in registers from them and feed it to `tl.dot`, so the dense [B, R, H*W] matrix never
exists in memory. The factors are computed in fp64 (sample counts and positions as torchvision's in float64),
the pooling in fp32; tokens and gradients are read and written in their dtype.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _axis_factors(start, size, points, length, BLOCK: tl.constexpr):
    """Summed bilinear weights per pixel of `points` samples along one axis (torchvision's rules)."""
    # start, size: fp64 scalars in grid units; points: int32 scalar >= 0 -> [BLOCK] fp64
    pixels = tl.arange(0, BLOCK)
    factors = tl.zeros([BLOCK], dtype=tl.float64)
    for index in range(points):
        position = start + (index + 0.5) * size / points
        inside = (position >= -1.0) & (position <= length)
        position = tl.minimum(tl.maximum(position, 0.0), length)
        low = position.to(tl.int32)
        at_edge = low >= length - 1
        low = tl.where(at_edge, length - 1, low)
        high = tl.where(at_edge, low, low + 1)
        frac = tl.where(at_edge, 0.0, position - low)
        w_low = tl.where(inside, 1.0 - frac, 0.0)
        w_high = tl.where(inside, frac, 0.0)
        factors += tl.where(pixels == low, w_low, 0.0) + tl.where(pixels == high, w_high, 0.0)
    return factors


@triton.jit
def _sample_points(size, sampling_ratio, valid, MAX_POINTS: tl.constexpr):
    """torchvision's sampling grid per axis: the fixed ratio, else ceil(size) up to MAX_POINTS; none for
    masked boxes."""
    adaptive = tl.ceil(tl.minimum(tl.maximum(size, 0.0), MAX_POINTS)).to(tl.int32)
    points = tl.where(sampling_ratio > 0, sampling_ratio, adaptive)
    return tl.where(valid, points, 0)


@triton.jit
def region_factors_kernel(
    scaled_ptr, mask_ptr, rows_ptr, cols_ptr,
    sampling_ratio, height, width,
    MAX_POINTS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One program per box: rows[box] (already divided by the point count) and cols[box].

    In fp64, from boxes the launcher scaled in fp64 (a mul here may fuse with the -0.5 into one rounding): a
    box of a whole number of cells at a scale such as 1/14 then gets ceil(size) samples a side, as torchvision
    in float64, where fp32 put its size one ulp above the whole number and took one sample more."""
    # scaled: [B*R, 4] xyxy pixels * spatial_scale, fp64 contiguous; mask: [B*R] bool
    # -> rows: [B*R, H], cols: [B*R, W] fp32
    box = tl.program_id(0).to(tl.int64)
    x1 = tl.load(scaled_ptr + box * 4 + 0) - 0.5  # aligned=True: pixel centres
    y1 = tl.load(scaled_ptr + box * 4 + 1) - 0.5
    x2 = tl.load(scaled_ptr + box * 4 + 2) - 0.5
    y2 = tl.load(scaled_ptr + box * 4 + 3) - 0.5
    valid = tl.load(mask_ptr + box) != 0
    row_points = _sample_points(y2 - y1, sampling_ratio, valid, MAX_POINTS)
    col_points = _sample_points(x2 - x1, sampling_ratio, valid, MAX_POINTS)
    inv_count = 1.0 / tl.maximum(row_points * col_points, 1).to(tl.float64)
    rows = (_axis_factors(y1, y2 - y1, row_points, height, BLOCK_H) * inv_count).to(tl.float32)
    cols = _axis_factors(x1, x2 - x1, col_points, width, BLOCK_W).to(tl.float32)
    h = tl.arange(0, BLOCK_H)
    w = tl.arange(0, BLOCK_W)
    tl.store(rows_ptr + box * height + h, rows, mask=h < height)
    tl.store(cols_ptr + box * width + w, cols, mask=w < width)


@triton.jit
def _weight_tile(rows_ptr, cols_ptr, box, box_ok, token, token_ok, height, width):
    """Pooling weights of boxes x tokens, rebuilt from the axis factors (zero outside the valid ranges)."""
    # box: [BR] flat box ids; token: [BT] flat h*W + w -> [BR, BT] fp32
    ok = box_ok[:, None] & token_ok[None, :]
    row = tl.load(rows_ptr + box[:, None] * height + (token // width)[None, :], mask=ok, other=0.0)
    col = tl.load(cols_ptr + box[:, None] * width + (token % width)[None, :], mask=ok, other=0.0)
    return row * col


@triton.jit
def region_pool_fwd_kernel(
    tokens_ptr, rows_ptr, cols_ptr, out_ptr, norms_ptr,
    regions, channels, height, width,
    stride_tok_b, stride_tok_t, stride_tok_c,
    eps,
    NORMALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (image, box tile, channel tile): out = weights @ tokens, accumulated over token tiles.

    With NORMALIZE a program owns every channel of its boxes: it loops over the channel tiles,
    keeps the squared norms in registers, then rescales the rows it wrote.
    """
    # tokens: [B, H*W, C] strided -> out: [B, R, C] contiguous, norms: [B, R] fp32 (NORMALIZE only)
    image = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < regions
    box = image * regions + r
    n_tokens = height * width
    tokens_ptr += image * stride_tok_b
    c_first = 0 if NORMALIZE else tl.program_id(2) * BLOCK_C
    c_last = channels if NORMALIZE else c_first + BLOCK_C
    squares = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(c_first, c_last, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < channels
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for t0 in range(0, n_tokens, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_ok = t < n_tokens
            weights = _weight_tile(rows_ptr, cols_ptr, box, r_ok, t, t_ok, height, width)
            tile = tl.load(tokens_ptr + t[:, None] * stride_tok_t + c[None, :] * stride_tok_c,
                           mask=t_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(weights, tile, acc, input_precision=DOT_PRECISION)
        if NORMALIZE:
            squares += tl.sum(acc * acc, axis=1)
        out_tile = out_ptr + box[:, None] * channels + c[None, :]
        tl.store(out_tile, acc.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & c_ok[None, :])
    if NORMALIZE:
        norms = tl.sqrt(squares)
        tl.store(norms_ptr + box, norms, mask=r_ok)
        scale = 1.0 / tl.maximum(norms, eps)
        tl.debug_barrier()
        for c0 in range(0, channels, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            ok = r_ok[:, None] & (c < channels)[None, :]
            out_tile = out_ptr + box[:, None] * channels + c[None, :]
            pooled = tl.load(out_tile, mask=ok, other=0.0).to(tl.float32)
            tl.store(out_tile, (pooled * scale[:, None]).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def region_pool_bwd_kernel(
    grad_out_ptr, out_ptr, row_dots_ptr, norms_ptr, rows_ptr, cols_ptr, grad_tokens_ptr,
    regions, channels, height, width,
    stride_go_b, stride_go_r, stride_go_c,
    eps,
    NORMALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (image, token tile, channel tile): grad_tokens = weights^T @ grad_pooled over all boxes.

    Each gradient element is owned by one program that walks the boxes in a fixed order, so the
    result is bitwise reproducible without atomics. With NORMALIZE the gradient is first taken
    through F.normalize: (g - y <g, y>) / max(|x|, eps), the <g, y> term only where |x| >= eps.
    """
    # grad_out: [B, R, C] strided; out: [B, R, C] contiguous (normalised); row_dots, norms: [B, R] fp32
    # -> grad_tokens: [B, H*W, C] contiguous
    image = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    n_tokens = height * width
    t_ok = t < n_tokens
    c_ok = c < channels
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for r0 in range(0, regions, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < regions
        box = image * regions + r
        weights = _weight_tile(rows_ptr, cols_ptr, box, r_ok, t, t_ok, height, width)
        ok = r_ok[:, None] & c_ok[None, :]
        grad = tl.load(grad_out_ptr + image * stride_go_b + r[:, None] * stride_go_r + c[None, :] * stride_go_c,
                       mask=ok, other=0.0).to(tl.float32)
        if NORMALIZE:
            pooled = tl.load(out_ptr + box[:, None] * channels + c[None, :], mask=ok, other=0.0).to(tl.float32)
            norms = tl.load(norms_ptr + box, mask=r_ok, other=1.0)
            row_dots = tl.where(norms >= eps, tl.load(row_dots_ptr + box, mask=r_ok, other=0.0), 0.0)
            grad = (grad - pooled * row_dots[:, None]) / tl.maximum(norms, eps)[:, None]
        acc = tl.dot(tl.trans(weights), grad, acc, input_precision=DOT_PRECISION)
    out = grad_tokens_ptr + image * n_tokens * channels + t[:, None] * channels + c[None, :]
    tl.store(out, acc.to(grad_tokens_ptr.dtype.element_ty), mask=t_ok[:, None] & c_ok[None, :])
