"""Launchers of the contrastive kernels: buffers, tile sizes, groups and grids, behind the same two-method
interface as `TorchTiles` (loss_terms, grads) so the autograd Function does not care which runs.

The statistics launch has a (row groups x column groups) grid of rectangles (`stats_groups`: one wave of
programs, as square as the blocks allow, since each side's partial statistics take groups x its rows).
bf16 and fp32: one launch writes d(loss)/d(dot) of all [b, N] entries where that fits 1 GiB
(`takes_whole_grad_logits`), and cuBLAS multiplies it by the texts and its transpose by the images;
beyond, each gradient direction runs with the operands swapped, per stripe of anchor rows (`stripe_rows`,
bounded memory). fp16: per direction, one launch, one program per block of anchor rows; where those are
too few to fill the SMs, the other side's blocks are split across more programs (`split_count`), only at
small N (a few thousand on an H100), so those partial buffers stay a small multiple of the inputs.
Partial results are merged here, in group order.

Default tiles: 64 x 128 logits with 64-wide K steps and 4 pipeline stages for half precision on a GPU
(tensor-core sized, small enough that the fp32 tile, its logits and softmax weights stay in registers),
16 x 32 x 16 with 2 stages for fp32 (exact fp32 dots run on FMA units; every larger tile tried, and 1 or 3
stages, spilled 8-48 bytes on sm_80 or sm_90, some at 64-96 registers), and at most 32 under the CPU
interpreter, where every program is a Python loop and larger tiles only add masked work on tiny test
shapes. All of these compile without register spills for sm_80 and sm_90 (`python -m kernels.codegen`,
checked in the tests); their speed is not yet measured on a GPU.
"""
from __future__ import annotations

import math

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from kernels.contrastive.torch_chunked import ColumnMerge
from kernels.contrastive.triton_kernels import (finish_partials_kernel, grad_logits_kernel, grad_partials_kernel,
                                                merge_partials_kernel, row_terms_kernel, stats_partials_kernel)
from kernels.device import launch_device, multiprocessor_count

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# TRITON_INTERPRET=1 at import time runs the kernels on the CPU interpreter (the tests do this).
INTERPRETED = isinstance(stats_partials_kernel, InterpretedFunction)
# The default half-precision tiles take up to 240 registers x 256 threads (sm_80 and sm_90 codegen): one program
# per SM.
PROGRAMS_PER_MULTIPROCESSOR = 1
# (BLOCK_M, BLOCK_N, BLOCK_K) at most, by where the kernels run (see the module doc)
HALF_TILES, FP32_TILES, INTERPRETER_TILES = (64, 128, 64), (16, 32, 16), (32, 32, 32)
# Other half-precision tiles the GPU session times against HALF_TILES (benchmarks/gpu_session.py), spill-free
# too (kernels.codegen compiles them); 128 x 128 tiles and 64-wide K steps beside 128-row blocks spill.
CANDIDATE_HALF_TILES = ((64, 128, 32), (128, 64, 32))
# Elements per program of the statistics' merge / finish launches, and rows per program of the per-row loss
# terms: memory-bound element-wise work on O(N) floats.
FINISH_BLOCK, TERMS_ROWS = 1024, 32


def runs_on(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of `device`: CUDA ones, or any under the interpreter."""
    return device.type == "cuda" or INTERPRETED


def _fit(size: int, largest: int) -> int:
    """Power of two >= 16 (the tl.dot minimum), no larger than needed or than `largest`."""
    return max(16, min(largest, triton.next_power_of_2(max(size, 1))))


def split_count(anchor_blocks: int, other_blocks: int, multiprocessors: int | None) -> int:
    """How many programs share one anchor block: as many as fit the GPU in one wave (no second, part-empty
    one), no more than there are blocks to share out, and 1 off the GPU. At N = 4096 with 64-row anchor
    blocks one program per block would leave 68 of an H100's 132 SMs idle."""
    if not multiprocessors:
        return 1
    wanted = PROGRAMS_PER_MULTIPROCESSOR * multiprocessors // max(anchor_blocks, 1)
    return max(1, min(wanted, other_blocks))


# The bf16 / fp32 backward writes d(loss)/d(dot) for cuBLAS. Up to WHOLE_GRAD_LOGITS_BUDGET_BYTES it holds all
# [b, N] of it at once and takes the texts' gradient from its transpose (3 GEMMs per tile, no second recompute);
# beyond, each direction writes stripes of its anchor rows against all the others: at most
# GRAD_LOGITS_BUDGET_BYTES, or GEMM_STRIPE_MIN_ROWS rows if more (thinner GEMMs run slowly), whatever N is.
WHOLE_GRAD_LOGITS_BUDGET_BYTES = 2**30
GRAD_LOGITS_BUDGET_BYTES = 256 * 2**20
GEMM_STRIPE_MIN_ROWS = 256


def takes_whole_grad_logits(rows: int, others: int, element_bytes: int) -> bool:
    """Whether the cuBLAS backward holds d(loss)/d(dot) of all rows at once: within
    WHOLE_GRAD_LOGITS_BUDGET_BYTES (world 1 in bf16: N up to ~23k, where ClipLoss is the yardstick)."""
    return rows * others * element_bytes <= WHOLE_GRAD_LOGITS_BUDGET_BYTES


def stripe_rows(rows: int, others: int, element_bytes: int, block_m: int) -> int:
    """Anchor rows per stripe of the cuBLAS backward: whole blocks within GRAD_LOGITS_BUDGET_BYTES."""
    within_budget = GRAD_LOGITS_BUDGET_BYTES // (element_bytes * max(others, 1)) // block_m * block_m
    return max(1, min(rows, max(GEMM_STRIPE_MIN_ROWS, within_budget)))


def stats_groups(row_blocks: int, col_blocks: int, multiprocessors: int | None) -> tuple[int, int]:
    """(row groups, column groups) of the statistics grid: one wave of PROGRAMS_PER_MULTIPROCESSOR programs
    per SM, never more (a few programs over would run as a second wave, alone), as square as the blocks
    allow (the partial statistics take groups x rows on each side), and (1, 1) off the GPU."""
    if not multiprocessors:
        return 1, 1
    programs = PROGRAMS_PER_MULTIPROCESSOR * multiprocessors
    col_groups = min(col_blocks, max(1, math.isqrt(programs)))
    row_groups = min(row_blocks, programs // col_groups)
    return row_groups, min(col_blocks, max(col_groups, programs // row_groups))


def _groups_of(blocks: int, groups: int) -> tuple[int, int]:
    """(groups, blocks per group) with none of the groups empty."""
    per_group = triton.cdiv(blocks, max(1, min(groups, blocks)))
    return triton.cdiv(blocks, per_group), per_group


class TritonTiles:
    """Runs the statistics and gradient kernels; block sizes default per dtype (see module doc)."""

    def __init__(self, block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
                 upcast: bool | None = None, groups: tuple[int, int] | None = None, splits: int | None = None,
                 fused_backward: bool | None = None, stripe: int | None = None):
        """`upcast` computes the dots in fp32; default: for fp32 inputs and under the interpreter, where
        bf16 tl.dot misbehaves. Tests set it False to run the GPU's half-precision path (fp16) on the CPU.
        `groups` fixes the statistics grid's (row groups, column groups), `splits` how many programs share a
        gradient block (defaults: `stats_groups`, `split_count`). `fused_backward` multiplies d(loss)/d(dot)
        by the other side inside the kernel instead of in cuBLAS (default: for fp16 only, whose per-tile
        rescaling cuBLAS cannot apply; bf16 and fp32 go through cuBLAS); `stripe` fixes the anchor rows per
        cuBLAS stripe, all of them at once where it is at least b (default: all at once where
        `takes_whole_grad_logits`, else `stripe_rows`)."""
        for name, value in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
            if value is not None and (value < 16 or value & (value - 1)):
                raise ValueError(f"{name}: got {value}, expected a power of two >= 16")
        if splits is not None and splits < 1:
            raise ValueError(f"splits: got {splits}, expected at least 1")
        if groups is not None and (len(groups) != 2 or min(groups) < 1):
            raise ValueError(f"groups: got {groups}, expected (row groups, column groups), each at least 1")
        if stripe is not None and stripe < 1:
            raise ValueError(f"stripe: got {stripe}, expected at least 1 row")
        self.blocks = (block_m, block_n, block_k)
        self.upcast = upcast
        self.groups = groups
        self.splits = splits
        self.fused_backward = fused_backward
        self.stripe = stripe

    def _constants(self, anchors: torch.Tensor, others: torch.Tensor) -> dict:
        """Tile sizes and compile options for `anchors` [m, D] against `others` [n, D]."""
        half = anchors.dtype != torch.float32
        largest_m, largest_n, largest_k = INTERPRETER_TILES if INTERPRETED else (HALF_TILES if half else FP32_TILES)
        block_m, block_n, block_k = self.blocks
        block_m, block_n = block_m or _fit(anchors.shape[0], largest_m), block_n or _fit(others.shape[0], largest_n)
        return dict(
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k or _fit(anchors.shape[1], largest_k),
            UPCAST=(INTERPRETED or not half) if self.upcast is None else self.upcast,
            # 8 warps from a 64 x 128 logits tile up: with 4, 128 x 64 spilled 224-336 bytes (sm_90)
            num_warps=8 if half and block_m * block_n >= 64 * 128 and not INTERPRETED else 4,
            num_stages=4 if half else 2,
        )

    @staticmethod
    def _check(images: torch.Tensor, texts: torch.Tensor) -> None:
        if images.dtype not in SUPPORTED_DTYPES or texts.dtype != images.dtype:
            raise ValueError(f"features dtype: got {images.dtype} / {texts.dtype}, the triton backend expects "
                             f"one of {SUPPORTED_DTYPES}, the same for images and texts")

    def _row_grads(self, anchors: torch.Tensor, others: torch.Tensor, scale: torch.Tensor,
                   anchor_valid: torch.Tensor, other_valid: torch.Tensor, anchor_lse: torch.Tensor,
                   anchor_coef: torch.Tensor, other_lse: torch.Tensor, other_coef: torch.Tensor,
                   pair_offset: int, fused: bool) -> torch.Tensor:
        """Gradient w.r.t. the anchors of the coefficient-weighted log-sum-exps of both directions, less
        2 * scale * anchor_coef times the pair's dot (anchor i's pair: other i - pair_offset)."""
        # anchors: [m, D]; others: [n, D]; anchor_lse: [2, m]; anchor_*: [m]; other_lse: [2, n]; other_*: [n]
        # (as `grads` prepares them)
        # -> [m, D] in the anchors' dtype (cuBLAS) or fp32 (fused)
        constants = self._constants(anchors, others)
        if not fused:
            return self._row_grads_through_cublas(anchors, others, scale, anchor_valid, other_valid, anchor_lse,
                                                  anchor_coef, other_lse, other_coef, pair_offset, constants)
        rows, other_blocks = anchors.shape[0], triton.cdiv(others.shape[0], constants["BLOCK_N"])
        splits, blocks_per_split = _groups_of(other_blocks, self.splits or split_count(
            triton.cdiv(rows, constants["BLOCK_M"]), other_blocks, multiprocessor_count(anchors, INTERPRETED)))
        partials = anchors.new_zeros(splits, *anchors.shape, dtype=torch.float32)
        with launch_device(anchors):
            grad_partials_kernel[(triton.cdiv(rows, constants["BLOCK_M"]), splits)](
                anchors, others, anchor_valid, other_valid, scale, *anchor_lse, anchor_coef, *other_lse, other_coef,
                partials, rows, others.shape[0], anchors.shape[1], anchors.stride(0), others.stride(0),
                blocks_per_split, pair_offset, **constants)
        return partials[0] if splits == 1 else partials.sum(0)

    @staticmethod
    def _write_grad_logits(anchors: torch.Tensor, others: torch.Tensor, scale: torch.Tensor,
                           anchor_valid: torch.Tensor, other_valid: torch.Tensor, anchor_lse: torch.Tensor,
                           anchor_coef: torch.Tensor, other_lse: torch.Tensor, other_coef: torch.Tensor,
                           pair_offset: int, out: torch.Tensor, constants: dict) -> None:
        """d(loss)/d(dot) of the anchors' rows against all others into `out`, the tiles recomputed."""
        # anchors: [m, D]; others: [n, D]; anchor_lse: [2, m]; other_lse: [2, n]; out: [m, n] contiguous, in the
        # anchors' dtype
        rows, count = anchors.shape[0], others.shape[0]
        with launch_device(anchors):
            grad_logits_kernel[(triton.cdiv(count, constants["BLOCK_N"]), triton.cdiv(rows, constants["BLOCK_M"]))](
                anchors, others, anchor_valid, other_valid, scale, *anchor_lse, anchor_coef, *other_lse, other_coef,
                out, rows, count, anchors.shape[1], anchors.stride(0), others.stride(0), pair_offset, **constants)

    def _row_grads_through_cublas(self, anchors: torch.Tensor, others: torch.Tensor, scale: torch.Tensor,
                                  anchor_valid: torch.Tensor, other_valid: torch.Tensor, anchor_lse: torch.Tensor,
                                  anchor_coef: torch.Tensor, other_lse: torch.Tensor, other_coef: torch.Tensor,
                                  pair_offset: int, constants: dict) -> torch.Tensor:
        """Stripe by stripe of anchor rows: d(loss)/d(dot) against all others from the kernel (tiles recomputed),
        times the others in cuBLAS. Each gradient row is one GEMM row over all others, accumulated in fp32 and
        rounded once, into the anchors' dtype, as open_clip's are."""
        # anchors: [m, D]; others: [n, D] -> [m, D] in the anchors' dtype
        rows, count = anchors.shape[0], others.shape[0]
        stripe = min(rows, self.stripe or stripe_rows(rows, count, anchors.element_size(), constants["BLOCK_M"]))
        grad = torch.empty_like(anchors)
        grad_logits = anchors.new_empty(stripe, count)  # [stripe, n], reused
        for first in range(0, rows, stripe):
            last = min(first + stripe, rows)
            self._write_grad_logits(anchors[first:last], others, scale, anchor_valid[first:last], other_valid,
                                    anchor_lse[:, first:last], anchor_coef[first:last], other_lse, other_coef,
                                    pair_offset - first, grad_logits[:last - first], constants)
            torch.mm(grad_logits[:last - first], others, out=grad[first:last])
        return grad

    def _grads_from_whole_grad_logits(self, images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor,
                                      row_valid: torch.Tensor, col_valid: torch.Tensor, row_lse: torch.Tensor,
                                      row_coef: torch.Tensor, col_lse: torch.Tensor, col_coef: torch.Tensor,
                                      own_first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One launch writes d(loss)/d(dot) of all [b, N] entries (both directions' softmax terms and the label);
        the images' gradient is it times the texts, the texts' its transpose times the images, both in cuBLAS:
        each tile is recomputed once, not once per direction (3 GEMMs per tile instead of 4)."""
        # images: [b, D]; texts: [N, D]; row_lse: [2, b]; col_lse: [2, N] -> [b, D], [N, D] in the features' dtype
        grad_logits = images.new_empty(images.shape[0], texts.shape[0])
        self._write_grad_logits(images, texts, scale, row_valid, col_valid, row_lse, row_coef, col_lse, col_coef,
                                -own_first, grad_logits, self._constants(images, texts))
        return grad_logits @ texts, grad_logits.T @ images

    def loss_terms(self, images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, row_valid: torch.Tensor,
                   col_valid: torch.Tensor, own_first: int,
                   merge_columns: ColumnMerge | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row and column log-sum-exps (max, log sum) and the per-row loss terms (see `TilePasses`), in four
        launches at most: the statistics (one pass over the tiles, which also writes each anchor's pair), the
        merge of one process's column groups where ranks merge theirs next, the columns' finish, and the rows'
        finish with their loss terms."""
        # images: [b, D] local; texts: [N, D] gathered; scale: [] fp32; row_valid: [b], col_valid: [N] bool
        # -> row_lse: [2, b], col_lse: [2, N], terms: [2, b] fp32
        self._check(images, texts)
        images, texts = images.contiguous(), texts.contiguous()
        rows, cols = images.shape[0], texts.shape[0]
        if not (rows and cols):  # ranks hold the same b: no rank has rows, so none merges columns
            return (images.new_zeros(2, rows, dtype=torch.float32), images.new_zeros(2, cols, dtype=torch.float32),
                    images.new_zeros(2, rows, dtype=torch.float32))
        constants = self._constants(images, texts)
        row_blocks, col_blocks = triton.cdiv(rows, constants["BLOCK_M"]), triton.cdiv(cols, constants["BLOCK_N"])
        wanted = self.groups or stats_groups(row_blocks, col_blocks, multiprocessor_count(images, INTERPRETED))
        row_groups, row_blocks_per_group = _groups_of(row_blocks, wanted[0])
        col_groups, col_blocks_per_group = _groups_of(col_blocks, wanted[1])
        # (max, sum exp, sum exp * dot) per column group for the rows, per row group for the columns
        row_partials = images.new_empty(3, col_groups, rows, dtype=torch.float32)
        col_partials = images.new_empty(3, row_groups, cols, dtype=torch.float32)
        pair = images.new_empty(2, rows, dtype=torch.float32)  # each anchor's pair dot and logit
        col_finished = images.new_empty(3, cols, dtype=torch.float32)  # max, log sum, expected dot
        row_lse = images.new_empty(2, rows, dtype=torch.float32)  # max, log sum
        terms = images.new_empty(2, rows, dtype=torch.float32)
        scale, row_flags = scale.reshape(1).float(), row_valid.view(torch.int8)
        with launch_device(images):
            stats_partials_kernel[(row_groups, col_groups)](
                images, texts, row_flags, col_valid.view(torch.int8), scale, *row_partials, *col_partials, pair,
                rows, cols, images.shape[1], images.stride(0), texts.stride(0), row_blocks_per_group,
                col_blocks_per_group, own_first, **constants)
            column_grid = (triton.cdiv(cols, FINISH_BLOCK),)
            if merge_columns is None:
                finish_partials_kernel[column_grid](*col_partials, row_groups, cols, *col_finished, BLOCK=FINISH_BLOCK)
            else:
                merged = images.new_empty(3, cols, dtype=torch.float32)
                merge_partials_kernel[column_grid](*col_partials, row_groups, cols, *merged, BLOCK=FINISH_BLOCK)
                finish_partials_kernel[column_grid](*merge_columns(tuple(merged)), 1, cols, *col_finished,
                                                    BLOCK=FINISH_BLOCK)
            own = slice(own_first, own_first + rows)
            row_terms_kernel[(triton.cdiv(rows, TERMS_ROWS),)](
                pair, *row_partials, col_groups, rows, row_flags, *col_finished[:, own], row_lse, terms,
                BLOCK_R=TERMS_ROWS)
        return row_lse, col_finished[:2], terms

    def grads(self, images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor,
              row_valid: torch.Tensor, col_valid: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor,
              row_coef: torch.Tensor, col_coef: torch.Tensor, own_first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients w.r.t. images and texts of sum(row_coef * row_lse) + sum(col_coef * col_lse)
        - 2 * scale * sum(row_coef * pair dot), image i's pair being text own_first + i; the log-sum-exps in two
        parts (max, log sum), as `loss_terms` gives them."""
        # images: [b, D]; texts: [N, D]; row_lse: [2, b]; col_lse: [2, N]; row_coef: [b]; col_coef: [N]
        # -> image_grad: [b, D], text_grad: [N, D], each in the features' dtype (cuBLAS backward) or fp32 (fused)
        self._check(images, texts)
        images, texts = images.contiguous(), texts.contiguous()
        if not (images.shape[0] and texts.shape[0]):
            return torch.zeros_like(images), torch.zeros_like(texts)
        fused = images.dtype == torch.float16 if self.fused_backward is None else self.fused_backward
        if not fused and images.dtype == torch.float16:
            raise ValueError("fused_backward=False: fp16 d(loss)/d(dot) underflows fp16 at large N without the "
                             "fused kernel's per-tile rescaling; the cuBLAS backward takes bf16 or fp32")
        scale, row_valid, col_valid = scale.reshape(1).float(), row_valid.view(torch.int8), col_valid.view(torch.int8)
        row_lse, row_coef, col_lse, col_coef = (values.float().contiguous()
                                                for values in (row_lse, row_coef, col_lse, col_coef))
        rows, count = images.shape[0], texts.shape[0]
        if not fused and (rows <= self.stripe if self.stripe else
                          takes_whole_grad_logits(rows, count, images.element_size())):
            return self._grads_from_whole_grad_logits(images, texts, scale, row_valid, col_valid, row_lse, row_coef,
                                                      col_lse, col_coef, own_first)
        return (self._row_grads(images, texts, scale, row_valid, col_valid, row_lse, row_coef, col_lse, col_coef,
                                -own_first, fused),
                self._row_grads(texts, images, scale, col_valid, row_valid, col_lse, col_coef, row_lse, row_coef,
                                own_first, fused))
