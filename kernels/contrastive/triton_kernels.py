"""Triton kernels of the tiled contrastive loss, each written for one direction and called for both.

Write the logits as scale * A @ B^T. Row statistics of I @ T^T are the image -> text direction; row
statistics of T @ I^T, the same kernel with the operands swapped, are text -> image. The gradient of
A's rows has the same symmetry. So there are two kernels:
- `lse_partials_kernel` (1 GEMM per tile): running (max, sum exp, sum exp * dot) of a block of A's rows
  over a range of B's row blocks, kept in registers.
- `grad_partials_kernel` (2 GEMMs per tile): recompute the tile, turn it into d(loss)/d(dot), and
  add d(dot) @ B[cols] to A's gradient rows.
Called once per direction, that is 2 GEMMs per tile forward and 4 backward. The one-pass design this
replaced (1 + 3) had programs hand each row block to the next through spin-waited turns: the grid ran
as a wavefront of (row blocks + column blocks) dependent steps, each paying an atomic round trip, and
on an H100 it was 4.6-6.6x slower than open_clip's ClipLoss (BENCHMARKS.md, 2026-11-26). Here no program
waits for another: program (i, s) owns block i of A's rows and split s of B's row blocks, and writes
its own slice of a [splits, rows, ...] buffer that the launcher sums in a fixed order. No atomics, so
the results are bitwise reproducible, and programs may run in any order.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_rows(base_ptr, rows, row_in, stride, ks, dim, UPCAST: tl.constexpr):
    # -> [len(rows), len(ks)] in the input dtype, or fp32 when UPCAST
    block = tl.load(base_ptr + rows[:, None].to(tl.int64) * stride + ks[None, :],
                    mask=row_in[:, None] & (ks[None, :] < dim), other=0.0)
    if UPCAST:
        block = block.to(tl.float32)
    return block


@triton.jit
def _tile_dot(a_ptr, b_ptr, rows, row_in, cols, col_in, dim, stride_a, stride_b,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """a[rows] @ b[cols]^T with fp32 accumulation: the one GEMM that builds a tile."""
    # -> [BLOCK_M, BLOCK_N] fp32
    dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = _load_rows(a_ptr, rows, row_in, stride_a, ks, dim, UPCAST)
        b = _load_rows(b_ptr, cols, col_in, stride_b, ks, dim, UPCAST)
        if UPCAST:
            dot = tl.dot(a, tl.trans(b), dot, input_precision="ieee")
        else:
            dot = tl.dot(a, tl.trans(b), dot)
    return dot


@triton.jit
def _fp16_range(values):
    """(2^k, 2^-k) with max|values| * 2^k in [2^14, 2^15): moves a tile into fp16's normal range, exactly.

    d(loss)/d(logits) is about scale * coef * softmax with coef ~ 1/(2N): at N = 1M it is below fp16's
    smallest subnormal (6e-8) and the cast for the tensor cores flushed the whole gradient to 0; under a
    loss scale at small N it overflowed 65504. Scaled by a power of two of the tile's own largest value,
    cast, multiplied, then unscaled in fp32, nothing is lost that the cast did not lose already, and the
    result is bitwise the same wherever the unscaled cast neither underflowed nor overflowed."""
    top = tl.max(tl.max(tl.abs(values), axis=1), axis=0)
    biased = (top.to(tl.int32, bitcast=True) >> 23) & 0xFF  # fp32 exponent of the largest magnitude, + 127
    # 2^(14 - (biased - 127)), kept where it and its inverse are normal fp32 numbers (2^-126 .. 2^126)
    up = tl.minimum(tl.maximum(268 - biased, 1), 253)
    return (up << 23).to(tl.float32, bitcast=True), ((254 - up) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _shift(top):
    """The max, or 0 where nothing valid was seen, so exp() never evaluates -inf - -inf."""
    return tl.where(top == float("-inf"), 0.0, top)


@triton.jit
def _block_range(split, blocks_per_split, others_total, BLOCK_N: tl.constexpr):
    """The row blocks of B that split `split` covers: [first, last)."""
    first = split * blocks_per_split
    return first, tl.minimum(first + blocks_per_split, tl.cdiv(others_total, BLOCK_N))


@triton.jit
def lse_partials_kernel(
    a_ptr, b_ptr, a_valid_ptr, b_valid_ptr, scale_ptr, max_ptr, sum_ptr, dot_ptr,
    rows_total, others_total, dim, stride_a, stride_b, blocks_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    """Per row of A: (max, sum exp, sum exp * dot) of scale * A @ B^T over the valid entries of one split."""
    # a: [rows, D]; b: [others, D]; valid: [rows], [others] int8; max, sum, dot: [splits, rows] fp32
    # grid: (cdiv(rows, BLOCK_M), splits)
    split = tl.program_id(1)
    scale = tl.load(scale_ptr)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < rows_total
    row_ok = row_in & (tl.load(a_valid_ptr + rows, mask=row_in, other=0) != 0)
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    run_dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    first, last = _block_range(split, blocks_per_split, others_total, BLOCK_N)
    for col_block in range(first, last):
        cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
        col_in = cols < others_total
        col_ok = col_in & (tl.load(b_valid_ptr + cols, mask=col_in, other=0) != 0)
        dot = _tile_dot(a_ptr, b_ptr, rows, row_in, cols, col_in, dim, stride_a, stride_b,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
        logits = tl.where(row_ok[:, None] & col_ok[None, :], dot * scale, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        shift = _shift(new_max)
        weights = tl.exp(logits - shift[:, None])
        rescale = tl.exp(run_max - shift)
        run_sum = run_sum * rescale + tl.sum(weights, axis=1)
        run_dot = run_dot * rescale + tl.sum(weights * dot, axis=1)
        run_max = new_max
    out = split.to(tl.int64) * rows_total + rows
    tl.store(max_ptr + out, run_max, mask=row_in)
    tl.store(sum_ptr + out, run_sum, mask=row_in)
    tl.store(dot_ptr + out, run_dot, mask=row_in)


@triton.jit
def grad_partials_kernel(
    a_ptr, b_ptr, a_valid_ptr, b_valid_ptr, scale_ptr, a_lse_ptr, a_coef_ptr, b_lse_ptr, b_coef_ptr, grad_ptr,
    rows_total, others_total, dim, stride_a, stride_b, blocks_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    """d/dA of sum(a_coef * lse over A's rows) + sum(b_coef * lse over B's rows), over one split of B.

    d(loss)/d(dot) of entry (i, j) is scale * (a_coef[i] * softmax_i(j) + b_coef[j] * softmax_j(i)): both
    directions' softmax weights, each against its own log-sum-exp. This program alone owns its slice of
    `grad`, so it accumulates there (in L2 on a GPU) without waiting for anyone."""
    # a: [rows, D]; b: [others, D]; a_lse, a_coef: [rows] fp32; b_lse, b_coef: [others] fp32;
    # grad: [splits, rows, D] fp32 zeros, contiguous; grid: (cdiv(rows, BLOCK_M), splits)
    split = tl.program_id(1)
    scale = tl.load(scale_ptr)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < rows_total
    row_ok = row_in & (tl.load(a_valid_ptr + rows, mask=row_in, other=0) != 0)
    a_lse = tl.load(a_lse_ptr + rows, mask=row_in, other=0.0)
    a_coef = tl.load(a_coef_ptr + rows, mask=row_in, other=0.0)
    grad_rows = grad_ptr + split.to(tl.int64) * rows_total * dim + rows[:, None].to(tl.int64) * dim
    first, last = _block_range(split, blocks_per_split, others_total, BLOCK_N)
    for col_block in range(first, last):
        cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
        col_in = cols < others_total
        col_ok = col_in & (tl.load(b_valid_ptr + cols, mask=col_in, other=0) != 0)
        b_lse = tl.load(b_lse_ptr + cols, mask=col_in, other=0.0)
        b_coef = tl.load(b_coef_ptr + cols, mask=col_in, other=0.0)
        dot = _tile_dot(a_ptr, b_ptr, rows, row_in, cols, col_in, dim, stride_a, stride_b,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
        logits = tl.where(row_ok[:, None] & col_ok[None, :], dot * scale, float("-inf"))
        grad_dot = scale * (a_coef[:, None] * tl.exp(logits - a_lse[:, None])
                            + b_coef[None, :] * tl.exp(logits - b_lse[None, :]))
        unscale = 1.0
        if not UPCAST:
            if a_ptr.dtype.element_ty == tl.float16:  # bf16 has fp32's exponent range: no rescaling
                rescale, unscale = _fp16_range(grad_dot)
                grad_dot = grad_dot * rescale
            grad_dot = grad_dot.to(a_ptr.dtype.element_ty)
        for k0 in range(0, dim, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            b = _load_rows(b_ptr, cols, col_in, stride_b, ks, dim, UPCAST)
            if UPCAST:
                update = tl.dot(grad_dot, b, input_precision="ieee")
            else:
                update = tl.dot(grad_dot, b) * unscale
            inside = row_in[:, None] & (ks[None, :] < dim)
            tl.store(grad_rows + ks[None, :], tl.load(grad_rows + ks[None, :], mask=inside, other=0.0) + update,
                     mask=inside)
