"""Triton kernels of the tiled contrastive loss. No program ever waits for another.

Write the logits as scale * I @ T^T (local images against the gathered texts).
- `stats_partials_kernel` (1 GEMM per tile): program (g, h) owns a rectangle, row-block group g x
  column-block group h. Each tile it builds serves both directions: row (image -> text) statistics
  (max, sum exp, sum exp * dot) stay in registers over the group's columns; column (text -> image)
  statistics go to row group g's own slice of a [row_groups, N] buffer, updated by this program alone.
  The launcher merges the groups' partials in a fixed order. The program whose tiles hold an anchor's pair
  writes that pair's dot and logit, for a loss of (max - pair logit) + log sum: the log-sum-exps stay
  (max, log sum exp(x - max)) throughout, forward and backward (torch_chunked's module doc says why).
- Backward: row gradients need sums over columns and column gradients sums over rows, which no single
  owner of a tile can hold both of without waiting on the other.
  - bf16 and fp32: `grad_logits_kernel` recomputes the tiles and writes d(loss)/d(dot) in the features'
    dtype; cuBLAS multiplies it by the texts for the images' gradient and its transpose by the images for
    the texts': 3 GEMMs per tile, where all [b, N] of it fits 1 GiB (world 1 in bf16: N up to ~23k).
    Beyond, each direction recomputes its own stripes of rows (bounded memory) with the operands swapped:
    2 GEMMs per tile per direction.
  - fp16: `grad_partials_kernel`, once per direction with the operands swapped, recomputes each tile,
    turns it into d(loss)/d(dot), and adds d(dot) @ B[cols] to A's gradient rows, a read-modify-write of
    an fp32 accumulator in L2 (~28 flop per byte of L2 traffic at 64 x 128 tiles, so likely L2-bound: why
    bf16 goes through cuBLAS).
d(loss)/d(dot) includes the label logit's -1 on the pairs, so each gradient row comes out whole.
That is 1 GEMM per tile forward and 3 backward, 4 in all, the floor (5 beyond 1 GiB and in fp16). Three
small launches finish the forward (`merge_partials_kernel`, `finish_partials_kernel`, `row_terms_kernel`):
statistics of O(N) floats, which in torch were dozens of element-wise ops, each a launch.

The design this replaced (1 + 3 GEMMs) had programs hand each row block to the next through spin-waited
turns: the grid ran as a wavefront of (row blocks + column blocks) dependent steps, each paying an atomic
round trip, and on an H100 it was 4.6-6.6x slower than open_clip's ClipLoss (BENCHMARKS.md, 2026-11-26).
Without atomics the results are also bitwise reproducible, whatever order programs run in.
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
def _block_range(group, blocks_per_group, total, BLOCK: tl.constexpr):
    """The blocks of `total` rows that group `group` covers: [first, last)."""
    first = group * blocks_per_group
    return first, tl.minimum(first + blocks_per_group, tl.cdiv(total, BLOCK))


@triton.jit
def stats_partials_kernel(
    image_ptr, text_ptr, row_valid_ptr, col_valid_ptr, scale_ptr,
    row_max_ptr, row_sum_ptr, row_dot_ptr, col_max_ptr, col_sum_ptr, col_dot_ptr, pair_ptr,
    rows_total, cols_total, dim, stride_image, stride_text, row_blocks_per_group, col_blocks_per_group, own_first,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    """Row and column (max, sum exp, sum exp * dot) of scale * images @ texts^T over the valid entries of
    one rectangle: row-block group g x column-block group h, every tile built once for both directions.
    The tile holding image i's pair (text own_first + i) also writes that dot and its logit, the very values
    the maxes came from, so that the loss's max - pair logit is exact (0 for the top logit). The logit is
    stored, not recomputed beside that subtraction: there the compiler fused the two into an fma that skips
    the product's rounding (sm_90 PTX of row_terms_kernel multiplying scale * pair dot itself)."""
    # images: [b, D]; texts: [N, D]; valid: [b], [N] int8; row_*: [col_groups, b] fp32;
    # col_*: [row_groups, N] fp32; pair: [2, b] fp32 (dot, logit); grid: (row_groups, col_groups)
    group_g, group_h = tl.program_id(0), tl.program_id(1)
    scale = tl.load(scale_ptr)
    row_first, row_last = _block_range(group_g, row_blocks_per_group, rows_total, BLOCK_M)
    col_first, col_last = _block_range(group_h, col_blocks_per_group, cols_total, BLOCK_N)
    for row_block in range(row_first, row_last):
        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_in = rows < rows_total
        row_ok = row_in & (tl.load(row_valid_ptr + rows, mask=row_in, other=0) != 0)
        row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        row_dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
        pairs = rows + own_first
        pair_dot = tl.zeros((BLOCK_M,), dtype=tl.float32)  # each row's pair's, where in this group's columns
        for col_block in range(col_first, col_last):
            cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
            col_in = cols < cols_total
            col_ok = col_in & (tl.load(col_valid_ptr + cols, mask=col_in, other=0) != 0)
            # this rectangle's columns so far, read before the tile's GEMM so that their latency hides behind
            # it: in group g's slice, which no other program touches. The group's first row block finds
            # nothing written yet. The barrier orders this program's own store of them (at the previous row
            # block, possibly by other threads) before these loads: Triton orders only shared memory.
            col_out = group_g.to(tl.int64) * cols_total + cols
            seen = col_in & (row_block > row_first)
            tl.debug_barrier()
            old_max = tl.load(col_max_ptr + col_out, mask=seen, other=float("-inf"))
            old_sum = tl.load(col_sum_ptr + col_out, mask=seen, other=0.0)
            old_dot = tl.load(col_dot_ptr + col_out, mask=seen, other=0.0)
            dot = _tile_dot(image_ptr, text_ptr, rows, row_in, cols, col_in, dim, stride_image, stride_text,
                            BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
            logits = tl.where(row_ok[:, None] & col_ok[None, :], dot * scale, float("-inf"))

            new_max = tl.maximum(row_max, tl.max(logits, axis=1))
            shift = _shift(new_max)
            weights = tl.exp(logits - shift[:, None])
            rescale = tl.exp(row_max - shift)
            row_sum = row_sum * rescale + tl.sum(weights, axis=1)
            row_dot = row_dot * rescale + tl.sum(weights * dot, axis=1)
            row_max = new_max

            tile_max = tl.max(logits, axis=0)
            weights = tl.exp(logits - _shift(tile_max)[None, :])
            tile_sum = tl.sum(weights, axis=0)
            tile_dot = tl.sum(weights * dot, axis=0)
            top = tl.maximum(old_max, tile_max)
            old_weight = tl.exp(old_max - _shift(top))
            tile_weight = tl.exp(tile_max - _shift(top))
            tl.store(col_max_ptr + col_out, top, mask=col_in)
            tl.store(col_sum_ptr + col_out, old_sum * old_weight + tile_sum * tile_weight, mask=col_in)
            tl.store(col_dot_ptr + col_out, old_dot * old_weight + tile_dot * tile_weight, mask=col_in)
            # only the tiles crossing the pairs' diagonal: fewer registers (none spill) and no work elsewhere
            first_pair = row_block * BLOCK_M + own_first
            if (first_pair < col_block * BLOCK_N + BLOCK_N) & (col_block * BLOCK_N < first_pair + BLOCK_M):
                pair_dot += tl.sum(tl.where(cols[None, :] == pairs[:, None], dot, 0.0), axis=1)
        row_out = group_h.to(tl.int64) * rows_total + rows
        tl.store(row_max_ptr + row_out, row_max, mask=row_in)
        tl.store(row_sum_ptr + row_out, row_sum, mask=row_in)
        tl.store(row_dot_ptr + row_out, row_dot, mask=row_in)
        has_pair = row_in & (pairs >= col_first * BLOCK_N) & (pairs < col_last * BLOCK_N)
        tl.store(pair_ptr + rows, pair_dot, mask=has_pair)
        tl.store(pair_ptr + rows_total + rows, pair_dot * scale, mask=has_pair)


@triton.jit
def _merged_groups(max_ptr, sum_ptr, dot_ptr, groups, total, offsets, inside):
    """(max, sum exp, sum exp * dot) at `offsets` over `groups` partial statistics [groups, total], merged
    in group order (so bitwise repeatable). A NaN sum stays NaN whatever the max does with NaN."""
    top = tl.load(max_ptr + offsets, mask=inside, other=float("-inf"))
    for group in range(1, groups):
        top = tl.maximum(top, tl.load(max_ptr + group * total + offsets, mask=inside, other=float("-inf")))
    shift = _shift(top)
    merged_sum = tl.zeros_like(top)
    merged_dot = tl.zeros_like(top)
    for group in range(0, groups):
        at = group * total + offsets
        weight = tl.exp(tl.load(max_ptr + at, mask=inside, other=float("-inf")) - shift)
        merged_sum += tl.load(sum_ptr + at, mask=inside, other=0.0) * weight
        merged_dot += tl.load(dot_ptr + at, mask=inside, other=0.0) * weight
    return top, merged_sum, merged_dot


@triton.jit
def _finished(top, total, weighted_dot):
    """(max, log sum exp(x - max), softmax-expected dot): the log-sum-exp in two parts, never added (see
    torch_chunked's module doc); 0 where nothing was seen (a sum of exactly 0), NaN stays NaN:
    torch_chunked.finish_stats, element by element."""
    seen = total != 0
    safe_total = tl.where(seen, total, 1.0)
    return (tl.where(seen, _shift(top), 0.0), tl.where(seen, tl.log(safe_total), 0.0),
            tl.where(seen, weighted_dot / safe_total, 0.0))


@triton.jit
def merge_partials_kernel(max_ptr, sum_ptr, dot_ptr, groups, total, out_max_ptr, out_sum_ptr, out_dot_ptr,
                          BLOCK: tl.constexpr):
    """One rank's column statistics from its groups' partials, before the ranks merge theirs."""
    # *_ptr: [groups, total] fp32; out_*: [total] fp32; grid: (cdiv(total, BLOCK),)
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < total
    top, merged_sum, merged_dot = _merged_groups(max_ptr, sum_ptr, dot_ptr, groups, total, offsets, inside)
    tl.store(out_max_ptr + offsets, top, mask=inside)
    tl.store(out_sum_ptr + offsets, merged_sum, mask=inside)
    tl.store(out_dot_ptr + offsets, merged_dot, mask=inside)


@triton.jit
def finish_partials_kernel(max_ptr, sum_ptr, dot_ptr, groups, total, out_max_ptr, out_log_sum_ptr, expected_ptr,
                           BLOCK: tl.constexpr):
    """Column log-sum-exps (max, log sum) and expected dots from partial statistics: the groups' of one process,
    or the ranks' merged ones (groups = 1). One launch where torch took a dozen small ops."""
    # *_ptr: [groups, total] fp32; out_max, out_log_sum, expected: [total] fp32; grid: (cdiv(total, BLOCK),)
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < total
    top, log_sum, expected = _finished(*_merged_groups(max_ptr, sum_ptr, dot_ptr, groups, total, offsets, inside))
    tl.store(out_max_ptr + offsets, top, mask=inside)
    tl.store(out_log_sum_ptr + offsets, log_sum, mask=inside)
    tl.store(expected_ptr + offsets, expected, mask=inside)


@triton.jit
def row_terms_kernel(
    pair_ptr, max_ptr, sum_ptr, dot_ptr, groups, rows_total, valid_ptr, col_max_ptr, col_log_sum_ptr,
    col_expected_ptr, lse_ptr, terms_ptr, BLOCK_R: tl.constexpr,
):
    """Per anchor row, from its row partials, its pair's dot and logit x (as its forward tile held them) and
    the pair's finished column statistics: the row log-sum-exp (max, log sum; for the backward), the loss term
    0.5 * ((max_row - x) + log sum_row + (max_col - x) + log sum_col), and the logit-scale gradient term
    0.5 * (expected_row + expected_col) - pair dot; both 0 for masked rows."""
    # pair: [2, b] fp32 (dot, logit); max, sum, dot: [groups, b] fp32; valid: [b] int8; col_max, col_log_sum,
    # col_expected: [b] fp32 (own rows); lse: [2, b] fp32 (max, log sum); terms: [2, b] fp32;
    # grid: (cdiv(b, BLOCK_R),)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = rows < rows_total
    row_ok = row_in & (tl.load(valid_ptr + rows, mask=row_in, other=0) != 0)
    row_max, row_log_sum, row_expected = _finished(*_merged_groups(max_ptr, sum_ptr, dot_ptr, groups, rows_total,
                                                                   rows, row_in))
    pair_dot = tl.load(pair_ptr + rows, mask=row_in, other=0.0)
    pair_logit = tl.load(pair_ptr + rows_total + rows, mask=row_in, other=0.0)
    col_max = tl.load(col_max_ptr + rows, mask=row_in, other=0.0)
    col_log_sum = tl.load(col_log_sum_ptr + rows, mask=row_in, other=0.0)
    col_expected = tl.load(col_expected_ptr + rows, mask=row_in, other=0.0)
    tl.store(lse_ptr + rows, row_max, mask=row_in)
    tl.store(lse_ptr + rows_total + rows, row_log_sum, mask=row_in)
    loss = 0.5 * ((row_max - pair_logit) + row_log_sum + (col_max - pair_logit) + col_log_sum)
    tl.store(terms_ptr + rows, tl.where(row_ok, loss, 0.0), mask=row_in)
    tl.store(terms_ptr + rows_total + rows,
             tl.where(row_ok, 0.5 * (row_expected + col_expected) - pair_dot, 0.0), mask=row_in)


@triton.jit
def _grad_of_dot(dot, rows, cols, row_ok, col_ok, scale, a_max, a_log_sum, a_coef, b_max, b_log_sum, b_coef,
                 pair_offset):
    """d(loss)/d(dot) of a tile: scale * (a_coef[i] * softmax_i(j) + b_coef[j] * softmax_j(i)), both directions'
    softmax weights, each exp((x - max) - log sum) from its own log-sum-exp's two parts (where x is bitwise the
    forward's, a top pair logit's weight is exp(-log sum): its softmax - 1 as precise as the log sum and the exp;
    against one fp32 max + log sum ~100 it was off by up to 4e-6), less 2 * scale * a_coef[i] where j is row i's
    pair (i == j + pair_offset): the label logit, -1 in each direction. 0 outside the valid entries. The label
    term goes in here, before any rounding to half precision: added after a bf16 product (sum of p * t, then
    minus the pair t) it cancelled against the softmax's share and lost what bf16 rounded off, up to all of the
    gradient of a confident pair; here it cancels in fp32, as in open_clip's cross-entropy."""
    logits = tl.where(row_ok[:, None] & col_ok[None, :], dot * scale, float("-inf"))
    softmaxes = (a_coef[:, None] * tl.exp((logits - a_max[:, None]) - a_log_sum[:, None])
                 + b_coef[None, :] * tl.exp((logits - b_max[None, :]) - b_log_sum[None, :]))
    label = tl.where(rows[:, None] == cols[None, :] + pair_offset, 2.0 * a_coef[:, None], 0.0)
    return scale * (softmaxes - label)


@triton.jit
def grad_logits_kernel(
    a_ptr, b_ptr, a_valid_ptr, b_valid_ptr, scale_ptr, a_max_ptr, a_log_sum_ptr, a_coef_ptr, b_max_ptr,
    b_log_sum_ptr, b_coef_ptr, out_ptr,
    rows_total, others_total, dim, stride_a, stride_b, pair_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    """d(loss)/d(dot) of one tile of a stripe of A's rows against all of B, written in the output's dtype (A's),
    for cuBLAS to multiply by B (and, where the stripe is all of A, its transpose by A): 1 GEMM here, 1 or 2
    there, and no read-modify-write of an accumulator."""
    # a: [rows, D] (one stripe); b: [others, D]; a_max, a_log_sum, a_coef: [rows]; b_max, b_log_sum, b_coef:
    # [others] fp32;
    # out: [rows, others] contiguous; stripe row i's pair is B's row i - pair_offset;
    # grid: (cdiv(others, BLOCK_N), cdiv(rows, BLOCK_M)): the long side on the grid's x axis, which has no 65535 limit
    scale = tl.load(scale_ptr)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in, col_in = rows < rows_total, cols < others_total
    row_ok = row_in & (tl.load(a_valid_ptr + rows, mask=row_in, other=0) != 0)
    col_ok = col_in & (tl.load(b_valid_ptr + cols, mask=col_in, other=0) != 0)
    dot = _tile_dot(a_ptr, b_ptr, rows, row_in, cols, col_in, dim, stride_a, stride_b, BLOCK_M, BLOCK_N, BLOCK_K,
                    UPCAST)
    grad_dot = _grad_of_dot(dot, rows, cols, row_ok, col_ok, scale,
                            tl.load(a_max_ptr + rows, mask=row_in, other=0.0),
                            tl.load(a_log_sum_ptr + rows, mask=row_in, other=0.0),
                            tl.load(a_coef_ptr + rows, mask=row_in, other=0.0),
                            tl.load(b_max_ptr + cols, mask=col_in, other=0.0),
                            tl.load(b_log_sum_ptr + cols, mask=col_in, other=0.0),
                            tl.load(b_coef_ptr + cols, mask=col_in, other=0.0), pair_offset)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * others_total + cols[None, :],
             grad_dot.to(out_ptr.dtype.element_ty), mask=row_in[:, None] & col_in[None, :])


@triton.jit
def grad_partials_kernel(
    a_ptr, b_ptr, a_valid_ptr, b_valid_ptr, scale_ptr, a_max_ptr, a_log_sum_ptr, a_coef_ptr, b_max_ptr,
    b_log_sum_ptr, b_coef_ptr, grad_ptr,
    rows_total, others_total, dim, stride_a, stride_b, blocks_per_split, pair_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    """d/dA of sum(a_coef * lse over A's rows) + sum(b_coef * lse over B's rows) - 2 * scale * sum(a_coef * pair
    dot), over one split of B, the product done here: fp16's path (whose per-tile rescaling a cuBLAS GEMM cannot
    apply), and bf16's and fp32's when asked (`fused_backward`). This program alone owns its slice of `grad`, so
    it accumulates there (in L2 on a GPU) without waiting for anyone."""
    # a: [rows, D]; b: [others, D]; a_max, a_log_sum, a_coef: [rows] fp32; b_max, b_log_sum, b_coef: [others] fp32;
    # grad: [splits, rows, D] fp32 zeros, contiguous; A's row i's pair is B's row i - pair_offset;
    # grid: (cdiv(rows, BLOCK_M), splits)
    split = tl.program_id(1)
    scale = tl.load(scale_ptr)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < rows_total
    row_ok = row_in & (tl.load(a_valid_ptr + rows, mask=row_in, other=0) != 0)
    a_max = tl.load(a_max_ptr + rows, mask=row_in, other=0.0)
    a_log_sum = tl.load(a_log_sum_ptr + rows, mask=row_in, other=0.0)
    a_coef = tl.load(a_coef_ptr + rows, mask=row_in, other=0.0)
    grad_rows = grad_ptr + split.to(tl.int64) * rows_total * dim + rows[:, None].to(tl.int64) * dim
    first, last = _block_range(split, blocks_per_split, others_total, BLOCK_N)
    for col_block in range(first, last):
        cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
        col_in = cols < others_total
        col_ok = col_in & (tl.load(b_valid_ptr + cols, mask=col_in, other=0) != 0)
        b_max = tl.load(b_max_ptr + cols, mask=col_in, other=0.0)
        b_log_sum = tl.load(b_log_sum_ptr + cols, mask=col_in, other=0.0)
        b_coef = tl.load(b_coef_ptr + cols, mask=col_in, other=0.0)
        dot = _tile_dot(a_ptr, b_ptr, rows, row_in, cols, col_in, dim, stride_a, stride_b,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
        grad_dot = _grad_of_dot(dot, rows, cols, row_ok, col_ok, scale, a_max, a_log_sum, a_coef, b_max, b_log_sum,
                                b_coef, pair_offset)
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
            # this program's own store of these (at the previous column block, possibly by other threads)
            # before the load: Triton orders only shared memory
            tl.debug_barrier()
            tl.store(grad_rows + ks[None, :], tl.load(grad_rows + ks[None, :], mask=inside, other=0.0) + update,
                     mask=inside)
