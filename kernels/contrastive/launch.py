"""Launchers of the contrastive kernels: buffers, tile sizes and grids, behind the same two-method
interface as `TorchTiles` (stats, grads) so the autograd Function does not care which runs.

Default tiles: 64 x 128 logits with 64-wide K steps for half precision on a GPU (tensor-core sized,
small enough that the fp32 tile, its logits and softmax weights stay in registers), 64 x 64 x 16 for
fp32 (exact fp32 dots run on FMA units and cost registers: K = 32 made the backward spill 4.4 KB per
thread on sm_80 and sm_90), and at most 32 under the CPU interpreter, where every program is a Python
loop and larger tiles only add masked work on tiny test shapes. On a GPU, BLOCK_N is halved (down to
32, at 4 warps) while there are fewer column programs than SMs (see `fill_block_n`). All of these
compile without register spills for sm_80 and sm_90 (`python -m kernels.codegen`, checked in the
tests); their speed is not yet tuned on a GPU.
"""
from __future__ import annotations

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from kernels.contrastive.torch_chunked import Stats
from kernels.contrastive.triton_kernels import contrastive_grads_kernel, contrastive_stats_kernel
from kernels.device import launch_device, multiprocessor_count

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# TRITON_INTERPRET=1 at import time runs the kernels on the CPU interpreter (the tests do this).
INTERPRETED = isinstance(contrastive_stats_kernel, InterpretedFunction)


def runs_on(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of `device`: CUDA ones, or any under the interpreter."""
    return device.type == "cuda" or INTERPRETED


def _fit(size: int, largest: int) -> int:
    """Power of two >= 16 (the tl.dot minimum), no larger than needed or than `largest`."""
    return max(16, min(largest, triton.next_power_of_2(max(size, 1))))


def fill_block_n(columns: int, largest: int, multiprocessors: int | None) -> int:
    """BLOCK_N for `columns` gathered text rows: the largest tile, halved (down to 32) while the
    column programs are fewer than the GPU's SMs. One program owns a column block and walks every row
    block, so at N = 4096 with 128-wide blocks 32 programs would leave 100 of an H100's 132 SMs idle."""
    block_n = _fit(columns, largest)
    while multiprocessors and block_n > 32 and triton.cdiv(columns, block_n) < multiprocessors:
        block_n //= 2
    return block_n


class TritonTiles:
    """Runs the statistics and gradient kernels; block sizes default per dtype (see module doc)."""

    def __init__(self, block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
                 upcast: bool | None = None):
        """`upcast` computes the dots in fp32; default: for fp32 inputs and under the interpreter, where
        bf16 tl.dot misbehaves. Tests set it False to run the GPU's half-precision path (fp16) on the CPU."""
        for name, value in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
            if value is not None and (value < 16 or value & (value - 1)):
                raise ValueError(f"{name}: got {value}, expected a power of two >= 16")
        self.blocks = (block_m, block_n, block_k)
        self.upcast = upcast

    def _config(self, images: torch.Tensor, texts: torch.Tensor) -> dict:
        half = images.dtype != torch.float32
        largest_m, largest_n, largest_k = (32, 32, 32) if INTERPRETED else ((64, 128, 64) if half else (64, 64, 16))
        block_m, block_n, block_k = self.blocks
        block_n = block_n or fill_block_n(texts.shape[0], largest_n, multiprocessor_count(texts, INTERPRETED))
        return dict(
            BLOCK_M=block_m or _fit(images.shape[0], largest_m),
            BLOCK_N=block_n,
            BLOCK_K=block_k or _fit(images.shape[1], largest_k),
            UPCAST=(INTERPRETED or not half) if self.upcast is None else self.upcast,
            num_warps=8 if half and block_n >= 128 and not INTERPRETED else 4,
        )

    @staticmethod
    def _check(images: torch.Tensor, texts: torch.Tensor) -> None:
        if images.dtype not in SUPPORTED_DTYPES or texts.dtype != images.dtype:
            raise ValueError(f"features dtype: got {images.dtype} / {texts.dtype}, the triton backend expects "
                             f"one of {SUPPORTED_DTYPES}, the same for images and texts")

    @staticmethod
    def _counters(rows: int, config: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed ticket counter [1] and per-row-block turns [cdiv(rows, BLOCK_M)], from one allocation."""
        counters = torch.zeros(1 + triton.cdiv(rows, config["BLOCK_M"]), dtype=torch.int32, device=device)
        return counters[:1], counters[1:]

    def stats(self, images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor,
              row_valid: torch.Tensor, col_valid: torch.Tensor) -> tuple[Stats, Stats]:
        """Row (image -> text) and column (text -> image) statistics from one pass over the tiles."""
        # images: [b, D] local; texts: [N, D] gathered; scale: [] fp32; row_valid: [b]; col_valid: [N] bool
        self._check(images, texts)
        images, texts = images.contiguous(), texts.contiguous()
        rows, cols = images.shape[0], texts.shape[0]
        config = self._config(images, texts)
        row_stats = (torch.full((rows,), float("-inf"), device=images.device),
                     images.new_zeros(rows, dtype=torch.float32), images.new_zeros(rows, dtype=torch.float32))
        col_stats = tuple(images.new_empty(cols, dtype=torch.float32) for _ in range(3))
        ticket, turns = self._counters(rows, config, images.device)
        if rows and cols:
            with launch_device(images):
                contrastive_stats_kernel[(triton.cdiv(cols, config["BLOCK_N"]),)](
                    images, texts, row_valid.to(torch.int8), col_valid.to(torch.int8), scale.reshape(1).float(),
                    *row_stats, *col_stats, ticket, turns, rows, cols, images.shape[1], images.stride(0),
                    texts.stride(0), **config)
        else:
            col_stats = (torch.full((cols,), float("-inf"), device=images.device),
                         images.new_zeros(cols, dtype=torch.float32), images.new_zeros(cols, dtype=torch.float32))
        return row_stats, col_stats

    def grads(self, images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor,
              row_valid: torch.Tensor, col_valid: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor,
              row_coef: torch.Tensor, col_coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of sum(row_coef * row_lse) + sum(col_coef * col_lse) w.r.t. images and texts (fp32)."""
        # images: [b, D]; texts: [N, D]; row_*: [b]; col_*: [N] -> image_grad: [b, D], text_grad: [N, D] fp32
        self._check(images, texts)
        images, texts = images.contiguous(), texts.contiguous()
        rows, cols = images.shape[0], texts.shape[0]
        config = self._config(images, texts)
        image_grad = images.new_zeros(images.shape, dtype=torch.float32)
        text_grad = texts.new_zeros(texts.shape, dtype=torch.float32)
        ticket, turns = self._counters(rows, config, images.device)
        if rows and cols:
            with launch_device(images):
                contrastive_grads_kernel[(triton.cdiv(cols, config["BLOCK_N"]),)](
                    images, texts, row_valid.to(torch.int8), col_valid.to(torch.int8), scale.reshape(1).float(),
                    row_lse.float().contiguous(), col_lse.float().contiguous(),
                    row_coef.float().contiguous(), col_coef.float().contiguous(),
                    image_grad, text_grad, ticket, turns, rows, cols, images.shape[1], images.stride(0),
                    texts.stride(0), **config)
        return image_grad, text_grad
