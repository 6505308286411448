"""Region pooling: Triton `region_pool` vs torchvision roi_align (+ NCHW copy, mask, normalise) vs the torch backend.

Run: `python -m pytest benchmarks/bench_roi_pool.py --benchmark-only`. On CUDA it sweeps model sizes
in bf16; on CPU the Triton kernels run in the interpreter, so it times tiny fp32 sizes and the
numbers only show that everything runs, not how the kernels perform.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from benchmarks.memory import peak_memory_bytes
from kernels.roi_pool import region_pool

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
DTYPE = torch.bfloat16 if ON_CUDA else torch.float32
PIXELS_PER_TOKEN = 16
# (batch, regions, (H, W), channels)
SIZES = [
    (32, 5, (14, 14), 768),
    (64, 20, (24, 24), 768),
    (128, 50, (32, 32), 1024),
    (256, 100, (14, 14), 768),
    (256, 100, (40, 40), 1024),
] if ON_CUDA else [
    (2, 4, (7, 7), 32),
    (3, 6, (9, 11), 40),
]


def torchvision_pool(tokens: torch.Tensor, boxes: torch.Tensor, grid_hw: tuple[int, int], spatial_scale: float,
                     box_mask: torch.Tensor) -> torch.Tensor:
    """The baseline: the model's path before the fused op (NCHW copy, roi_align, mask, F.normalize),
    with the boxes handed over as one [B*R, 5] rois tensor (a list makes torchvision launch a fill per
    image, which at B = 256 would time Python, not the GPU).

    torchvision's roi_align has no bf16 kernel (CPU or CUDA), so bf16 tokens are pooled in fp32, as a
    bf16 model without the fused op has to.
    """
    # tokens: [B, H*W, C]; boxes: [B, R, 4] xyxy pixels; box_mask: [B, R] -> [B, R, C]
    batch, regions = boxes.shape[:2]
    channels = tokens.shape[-1]
    compute_dtype = torch.float32 if tokens.dtype == torch.bfloat16 else tokens.dtype
    feature_map = tokens.transpose(1, 2).reshape(batch, channels, *grid_hw).to(compute_dtype)
    image_index = torch.arange(batch, device=boxes.device, dtype=compute_dtype).repeat_interleave(regions)
    rois = torch.cat([image_index.unsqueeze(1), boxes.reshape(-1, 4).to(compute_dtype)], dim=1)
    pooled = roi_align(feature_map, rois, output_size=1, spatial_scale=spatial_scale,
                       sampling_ratio=-1, aligned=True).view(batch, regions, channels)
    return F.normalize(pooled * box_mask.unsqueeze(-1).to(pooled.dtype), dim=-1).to(tokens.dtype)


IMPLEMENTATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "triton": lambda *args: region_pool(*args, normalize=True, backend="triton"),
    "torch": lambda *args: region_pool(*args, normalize=True, backend="torch"),
    "torchvision": torchvision_pool,
}


def make_inputs(batch: int, regions: int, grid_hw: tuple[int, int], channels: int, device: torch.device,
                dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Tokens, boxes inside the image (at least one token wide), a box mask with ~20% padding, the scale."""
    # -> tokens [B, H*W, C] in `dtype`, boxes [B, R, 4] fp32 (as the model passes them), box_mask [B, R], scale
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, grid_hw[0] * grid_hw[1], channels, generator=generator)
    image = torch.tensor([grid_hw[1], grid_hw[0]], dtype=torch.float32) * PIXELS_PER_TOKEN
    corner = torch.rand(batch, regions, 2, generator=generator) * (image - PIXELS_PER_TOKEN)
    extent = PIXELS_PER_TOKEN + torch.rand(batch, regions, 2, generator=generator) * (image - PIXELS_PER_TOKEN - corner)
    boxes = torch.cat([corner, corner + extent], dim=-1)
    box_mask = torch.rand(batch, regions, generator=generator) < 0.8
    return tokens.to(device, dtype), boxes.to(device), box_mask.to(device), 1 / PIXELS_PER_TOKEN


def _synchronized(fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        fn()
        if ON_CUDA:
            torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("size", SIZES, ids=lambda size: "B{}-R{}-{}x{}-C{}".format(size[0], size[1], *size[2], size[3]))
def test_region_pool(benchmark, size, implementation, mode):
    batch, regions, grid_hw, channels = size
    tokens, boxes, box_mask, scale = make_inputs(batch, regions, grid_hw, channels, DEVICE, DTYPE)
    pool = IMPLEMENTATIONS[implementation]
    if mode == "forward":
        def step() -> None:
            with torch.no_grad():
                pool(tokens, boxes, grid_hw, scale, box_mask)
    else:
        tokens.requires_grad_()
        grad_out = torch.randn(batch, regions, channels, device=DEVICE, dtype=DTYPE)

        def step() -> None:
            pool(tokens, boxes, grid_hw, scale, box_mask).backward(grad_out)
            tokens.grad = None

    step = _synchronized(step)
    step()  # compile / warm up outside the timing and the memory measurement
    benchmark.group = f"region_pool {mode} B{batch} R{regions} {grid_hw[0]}x{grid_hw[1]} C{channels}"
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name(DEVICE) if ON_CUDA else "cpu",
        "triton_interpreter": not ON_CUDA,
        "dtype": str(DTYPE),
        "batch": batch, "regions": regions, "grid_hw": list(grid_hw), "channels": channels,
        "peak_memory_bytes": peak_memory_bytes(step, DEVICE),
    })
    benchmark(step)
