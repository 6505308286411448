"""Triton kernels of the tiled contrastive loss: one statistics pass forward, one recomputing pass back.

Grid: one program per block of BLOCK_N gathered text rows (columns of the logits); each program walks
every block of BLOCK_M local image rows. Per tile it computes dot = images @ texts^T once.
- Forward (1 GEMM per tile): column statistics stay in the program's registers; the tile's row
  statistics are merged into global [b] buffers.
- Backward (3 GEMMs per tile): recompute dot, turn it into d(loss)/d(dot), then
  text_grad[cols] += dS^T @ images (owned by this program) and image_grad[rows] += dS @ texts.
Row-indexed buffers are shared by all programs. Instead of float atomics (whose order, and so whose
rounding, changes from run to run) programs take turns per row block: the program holding column
block j updates row block i only after the one holding j-1 did (`turns[i] == j`). The order is fixed,
so results are bitwise reproducible; programs drift one tile apart and then run concurrently.
Column blocks are handed out by an atomic ticket counter when a program starts, not by program id,
as CUB's single-pass scan does: a program only ever waits for one that started before it and so holds
an SM, whatever order the GPU starts programs in. Waiting on program ids instead would deadlock if a
later program occupied the SMs while an earlier one had not yet started (the tests run the programs
in reverse order to check this).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _take_ticket(ticket_ptr):
    """The next column block to work on, in the order programs actually started."""
    return tl.atomic_add(ticket_ptr, 1)


@triton.jit
def _wait_turn(turn_ptr, ticket):
    while tl.atomic_add(turn_ptr, 0) != ticket:
        pass


@triton.jit
def _pass_turn(turn_ptr, next_ticket):
    tl.debug_barrier()  # every thread's stores are issued before the release below publishes them
    tl.atomic_xchg(turn_ptr, next_ticket)


@triton.jit
def _load_rows(base_ptr, rows, row_in, stride, ks, dim, UPCAST: tl.constexpr):
    # -> [len(rows), len(ks)] in the input dtype, or fp32 when UPCAST
    block = tl.load(base_ptr + rows[:, None].to(tl.int64) * stride + ks[None, :],
                    mask=row_in[:, None] & (ks[None, :] < dim), other=0.0)
    if UPCAST:
        block = block.to(tl.float32)
    return block


@triton.jit
def _tile_dot(image_ptr, text_ptr, rows, row_in, cols, col_in, dim, stride_image, stride_text,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """images[rows] @ texts[cols]^T with fp32 accumulation: the one GEMM that builds a tile."""
    # -> [BLOCK_M, BLOCK_N] fp32
    dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        image = _load_rows(image_ptr, rows, row_in, stride_image, ks, dim, UPCAST)
        text = _load_rows(text_ptr, cols, col_in, stride_text, ks, dim, UPCAST)
        if UPCAST:
            dot = tl.dot(image, tl.trans(text), dot, input_precision="ieee")
        else:
            dot = tl.dot(image, tl.trans(text), dot)
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
def contrastive_stats_kernel(
    image_ptr, text_ptr, row_valid_ptr, col_valid_ptr, scale_ptr,
    row_max_ptr, row_sum_ptr, row_dot_ptr, col_max_ptr, col_sum_ptr, col_dot_ptr, ticket_ptr, turn_ptr,
    rows_total, cols_total, dim, stride_image, stride_text,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    """Row and column (max, sum exp, sum exp * dot) of scale * images @ texts^T over valid entries."""
    # images: [b, D]; texts: [N, D]; valid: [b], [N] int8; row_*: [b] fp32 (pre-set to -inf, 0, 0);
    # col_*: [N] fp32 written here; ticket: [1], turns: [cdiv(b, BLOCK_M)] int32 zeros
    col_block = _take_ticket(ticket_ptr)
    scale = tl.load(scale_ptr)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_in = cols < cols_total
    col_ok = col_in & (tl.load(col_valid_ptr + cols, mask=col_in, other=0) != 0)
    col_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    col_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    col_dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for row_block in range(0, tl.cdiv(rows_total, BLOCK_M)):
        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_in = rows < rows_total
        row_ok = row_in & (tl.load(row_valid_ptr + rows, mask=row_in, other=0) != 0)
        dot = _tile_dot(image_ptr, text_ptr, rows, row_in, cols, col_in, dim, stride_image, stride_text,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
        logits = tl.where(row_ok[:, None] & col_ok[None, :], dot * scale, float("-inf"))

        new_max = tl.maximum(col_max, tl.max(logits, axis=0))
        shift = _shift(new_max)
        weights = tl.exp(logits - shift[None, :])
        rescale = tl.exp(col_max - shift)
        col_sum = col_sum * rescale + tl.sum(weights, axis=0)
        col_dot = col_dot * rescale + tl.sum(weights * dot, axis=0)
        col_max = new_max

        tile_max = tl.max(logits, axis=1)
        weights = tl.exp(logits - _shift(tile_max)[:, None])
        tile_sum = tl.sum(weights, axis=1)
        tile_dot = tl.sum(weights * dot, axis=1)
        _wait_turn(turn_ptr + row_block, col_block)
        old_max = tl.load(row_max_ptr + rows, mask=row_in, other=float("-inf"), cache_modifier=".cg")
        old_sum = tl.load(row_sum_ptr + rows, mask=row_in, other=0.0, cache_modifier=".cg")
        old_dot = tl.load(row_dot_ptr + rows, mask=row_in, other=0.0, cache_modifier=".cg")
        top = tl.maximum(old_max, tile_max)
        old_weight = tl.exp(old_max - _shift(top))
        tile_weight = tl.exp(tile_max - _shift(top))
        tl.store(row_max_ptr + rows, top, mask=row_in)
        tl.store(row_sum_ptr + rows, old_sum * old_weight + tile_sum * tile_weight, mask=row_in)
        tl.store(row_dot_ptr + rows, old_dot * old_weight + tile_dot * tile_weight, mask=row_in)
        _pass_turn(turn_ptr + row_block, col_block + 1)
    tl.store(col_max_ptr + cols, col_max, mask=col_in)
    tl.store(col_sum_ptr + cols, col_sum, mask=col_in)
    tl.store(col_dot_ptr + cols, col_dot, mask=col_in)


@triton.jit
def contrastive_grads_kernel(
    image_ptr, text_ptr, row_valid_ptr, col_valid_ptr, scale_ptr,
    row_lse_ptr, col_lse_ptr, row_coef_ptr, col_coef_ptr, image_grad_ptr, text_grad_ptr, ticket_ptr, turn_ptr,
    rows_total, cols_total, dim, stride_image, stride_text,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    """Gradients of sum(row_coef * row_lse) + sum(col_coef * col_lse) w.r.t. images and texts."""
    # images: [b, D]; texts: [N, D]; row_lse, row_coef: [b] fp32; col_lse, col_coef: [N] fp32;
    # image_grad: [b, D], text_grad: [N, D] fp32 zeros, both contiguous; ticket: [1], turns: [cdiv(b, BLOCK_M)]
    # int32 zeros
    col_block = _take_ticket(ticket_ptr)
    scale = tl.load(scale_ptr)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_in = cols < cols_total
    col_ok = col_in & (tl.load(col_valid_ptr + cols, mask=col_in, other=0) != 0)
    col_lse = tl.load(col_lse_ptr + cols, mask=col_in, other=0.0)
    col_coef = tl.load(col_coef_ptr + cols, mask=col_in, other=0.0)
    for row_block in range(0, tl.cdiv(rows_total, BLOCK_M)):
        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_in = rows < rows_total
        row_ok = row_in & (tl.load(row_valid_ptr + rows, mask=row_in, other=0) != 0)
        row_lse = tl.load(row_lse_ptr + rows, mask=row_in, other=0.0)
        row_coef = tl.load(row_coef_ptr + rows, mask=row_in, other=0.0)
        dot = _tile_dot(image_ptr, text_ptr, rows, row_in, cols, col_in, dim, stride_image, stride_text,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
        logits = tl.where(row_ok[:, None] & col_ok[None, :], dot * scale, float("-inf"))
        grad_dot = scale * (row_coef[:, None] * tl.exp(logits - row_lse[:, None])
                            + col_coef[None, :] * tl.exp(logits - col_lse[None, :]))
        unscale = 1.0
        if not UPCAST:
            if image_ptr.dtype.element_ty == tl.float16:  # bf16 has fp32's exponent range: no rescaling
                rescale, unscale = _fp16_range(grad_dot)
                grad_dot = grad_dot * rescale
            grad_dot = grad_dot.to(image_ptr.dtype.element_ty)

        for k0 in range(0, dim, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            image = _load_rows(image_ptr, rows, row_in, stride_image, ks, dim, UPCAST)
            offsets = cols[:, None].to(tl.int64) * dim + ks[None, :]
            inside = col_in[:, None] & (ks[None, :] < dim)
            if UPCAST:
                update = tl.dot(tl.trans(grad_dot), image, input_precision="ieee")
            else:
                update = tl.dot(tl.trans(grad_dot), image) * unscale
            tl.store(text_grad_ptr + offsets, tl.load(text_grad_ptr + offsets, mask=inside, other=0.0) + update,
                     mask=inside)

        _wait_turn(turn_ptr + row_block, col_block)
        for k0 in range(0, dim, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            text = _load_rows(text_ptr, cols, col_in, stride_text, ks, dim, UPCAST)
            offsets = rows[:, None].to(tl.int64) * dim + ks[None, :]
            inside = row_in[:, None] & (ks[None, :] < dim)
            if UPCAST:
                update = tl.dot(grad_dot, text, input_precision="ieee")
            else:
                update = tl.dot(grad_dot, text) * unscale
            old = tl.load(image_grad_ptr + offsets, mask=inside, other=0.0, cache_modifier=".cg")
            tl.store(image_grad_ptr + offsets, old + update, mask=inside)
        _pass_turn(turn_ptr + row_block, col_block + 1)
