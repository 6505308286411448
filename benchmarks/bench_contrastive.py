"""Contrastive loss: Triton `contrastive_loss` vs open_clip ClipLoss vs the tiled torch path vs inf-cl.

Run: `python -m pytest benchmarks/bench_contrastive.py --benchmark-only`. World size 1 (b = N).
On CUDA it times bf16 at N = 4k..1M (ClipLoss only where its N x N logits fit); on CPU the Triton
kernels run in the interpreter, so it times tiny fp32 sizes that only show everything runs. The CPU
memory test is real on any device: peak memory of the tiled torch path must stay flat while N grows
4x at fixed feature storage (N * D constant), and ClipLoss's must grow with the N x N logits.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from benchmarks.memory import peak_memory_bytes
from kernels.contrastive import contrastive_loss
from kernels.contrastive.function import ContrastiveLossFunction
from kernels.contrastive.torch_chunked import TorchTiles

try:
    from inf_cl import cal_inf_loss
except ImportError:
    cal_inf_loss = None

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
DTYPE = torch.bfloat16 if ON_CUDA else torch.float32
# (global N, D)
SIZES = [(4096, 512), (16384, 512), (65536, 1024), (262144, 1024), (1048576, 512)] if ON_CUDA else [(64, 32), (200, 48)]
CLIP_LOSS_MAX_N = 65536  # two N x N logits and their gradients; beyond this they do not fit in 80 GB
TORCH_TILED_MAX_N = 65536  # a Python loop over tiles: correct at any N, but minutes per step beyond this


def make_inputs(rows: int, dim: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Normalised features (as the towers hand them over) and an exponentiated logit scale."""
    # -> images, texts: [N, D] dtype; logit_scale: [] fp32 requiring grad
    generator = torch.Generator(device=device).manual_seed(seed)
    images = F.normalize(torch.randn(rows, dim, device=device, generator=generator), dim=-1).to(dtype)
    texts = F.normalize(torch.randn(rows, dim, device=device, generator=generator), dim=-1).to(dtype)
    return images, texts, torch.tensor(100.0, device=device, requires_grad=True)


def _group_of_one(device: torch.device) -> None:
    """inf-cl's backward all-reduces over the default process group even on one GPU ('Default process group has
    not been initialized' on the first H100 run): a group of this process alone."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)


def inf_cl_loss(images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric loss from inf-cl's one-direction `cal_inf_loss`, as its README combines it."""
    _group_of_one(images.device)
    labels = torch.arange(images.shape[0], device=images.device)
    return (cal_inf_loss(images, texts, labels=labels, scale=logit_scale)
            + cal_inf_loss(texts, images, labels=labels, scale=logit_scale)) / 2


IMPLEMENTATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "triton": lambda i, t, s: contrastive_loss(i, t, s, backend="triton"),
    "torch_tiled": lambda i, t, s: contrastive_loss(i, t, s, backend="torch"),
    "open_clip": ClipLoss(local_loss=True, gather_with_grad=True),
    "inf_cl": inf_cl_loss,
}


def fits(name: str, rows: int) -> bool:
    return not ((name == "open_clip" and rows > CLIP_LOSS_MAX_N) or (name == "torch_tiled" and rows > TORCH_TILED_MAX_N))


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("size", SIZES, ids=lambda size: f"N{size[0]}-D{size[1]}")
def test_contrastive_loss_speed(benchmark, size, name, mode):
    rows, dim = size
    if name == "inf_cl" and cal_inf_loss is None:
        pytest.skip("inf-cl is not installed (`import inf_cl` failed)")
    if not fits(name, rows):
        pytest.skip(f"{name} at N={rows}: see CLIP_LOSS_MAX_N / TORCH_TILED_MAX_N")
    images, texts, logit_scale = make_inputs(rows, dim, DEVICE, DTYPE)
    loss_fn = IMPLEMENTATIONS[name]
    if mode == "forward":
        images_in, texts_in = images, texts

        def step() -> None:
            with torch.no_grad():
                loss_fn(images_in, texts_in, logit_scale)
    else:
        images_in, texts_in = images.requires_grad_(), texts.requires_grad_()

        def step() -> None:
            loss_fn(images_in, texts_in, logit_scale).backward()
            images_in.grad = texts_in.grad = logit_scale.grad = None

    def synced_step() -> None:
        step()
        if ON_CUDA:
            torch.cuda.synchronize()

    synced_step()  # compile / warm up outside the timing and the memory measurement
    peak = peak_memory_bytes(synced_step, DEVICE)
    benchmark.extra_info.update({"device": torch.cuda.get_device_name() if ON_CUDA else "cpu",
                                 "dtype": str(DTYPE), "N": rows, "D": dim, "world": 1, "mode": mode,
                                 "peak_memory_bytes": peak})
    benchmark.pedantic(synced_step, rounds=3 if ON_CUDA or name != "triton" else 1, iterations=1)


def _tiled_torch_loss(tile: int) -> Callable[..., torch.Tensor]:
    passes = TorchTiles(tile=tile)
    return lambda i, t, s: ContrastiveLossFunction.apply(i, t, s, None, None, passes)  # unmasked, as the API


def _fwd_bwd_peak(loss_fn: Callable[..., torch.Tensor], rows: int, dim: int) -> int:
    images, texts, logit_scale = make_inputs(rows, dim, torch.device("cpu"), torch.float32)
    images.requires_grad_()
    texts.requires_grad_()
    return peak_memory_bytes(lambda: loss_fn(images, texts, logit_scale).backward(), "cpu")


def test_tiled_memory_is_flat_in_n_while_clip_loss_grows(benchmark):
    """N grows 4x at constant N * D, so feature-sized buffers (inputs' gradients, the gathered texts'
    gradient) stay the same size and only memory that depends on N beyond them can grow. ClipLoss holds
    N x N logits (16x); the tiled path holds [tile x tile] blocks and O(N) statistics, so it stays flat.
    """
    tile = 256
    sizes = [(1024, 256), (4096, 64)]
    tiled = [_fwd_bwd_peak(_tiled_torch_loss(tile), rows, dim) for rows, dim in sizes]
    naive = [_fwd_bwd_peak(ClipLoss(local_loss=True, gather_with_grad=True), rows, dim) for rows, dim in sizes]
    benchmark.extra_info.update({"device": "cpu", "dtype": "torch.float32", "sizes (N, D)": sizes, "tile": tile,
                                 "tiled_peak_bytes": tiled, "open_clip_peak_bytes": naive})
    benchmark.pedantic(lambda: None, rounds=1)
    assert tiled[1] < 1.5 * tiled[0], f"tiled torch peak grew {tiled[1] / tiled[0]:.2f}x: {tiled} bytes"
    assert naive[1] > 8 * naive[0], f"ClipLoss peak grew only {naive[1] / naive[0]:.2f}x: {naive} bytes"
    assert tiled[1] < naive[1] / 10, f"tiled {tiled[1]} bytes vs ClipLoss {naive[1]} bytes at N={sizes[1][0]}"
