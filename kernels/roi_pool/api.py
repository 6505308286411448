"""Region pooling as callers use it: the functional `region_pool` and the `RegionPool` module."""
from __future__ import annotations

import math

import torch
from torch import nn

from kernels.roi_pool import reference
from kernels.roi_pool.function import RegionPoolFunction
from kernels.roi_pool.launch import SUPPORTED_DTYPES, runs_on
from kernels.roi_pool.reference import region_pool_torch

BACKENDS = ("triton", "torch", "auto")


def _check_inputs(tokens: torch.Tensor, boxes: torch.Tensor, grid_hw: tuple[int, int], spatial_scale: float,
                  box_mask: torch.Tensor | None, sampling_ratio: int, backend: str) -> None:
    """Every argument's type, shape and device, so that a mistake is named here, not deep in a kernel."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: got {backend!r}, expected one of {BACKENDS}")
    for name, value in (("tokens", tokens), ("boxes", boxes), ("box_mask", box_mask)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise ValueError(f"{name}: got a {type(value).__name__}, expected a tensor (per-image boxes of "
                             "different counts: pad them to [B, R, 4] and pass box_mask)")
    if tokens.dim() != 3 or not tokens.is_floating_point():
        raise ValueError(f"tokens: got shape {tuple(tokens.shape)} of {tokens.dtype}, expected [B, H*W, C] floats")
    if not isinstance(grid_hw, (tuple, list, torch.Size, torch.Tensor)) or len(grid_hw) != 2:
        raise ValueError(f"grid_hw: got {grid_hw!r}, expected (H, W)")
    height, width = grid_hw
    if int(height) != height or int(width) != width:
        raise ValueError(f"grid_hw: got {tuple(grid_hw)}, expected whole numbers (H, W)")
    if height < 1 or width < 1 or height * width != tokens.shape[1]:
        raise ValueError(f"grid_hw: got {tuple(grid_hw)}, expected positive (H, W) with H * W == tokens.shape[1] "
                         f"== {tokens.shape[1]}")
    if isinstance(spatial_scale, torch.Tensor) and spatial_scale.numel() != 1:
        raise ValueError(f"spatial_scale: got shape {tuple(spatial_scale.shape)}, expected one number (grid size / "
                         "image size, the same on both axes)")
    scale = float(spatial_scale)
    if not math.isfinite(scale) or scale <= 0:  # every box would pool a silent zero row (1 // 14 is 0)
        raise ValueError(f"spatial_scale: got {scale!r}, expected a positive finite number (grid size / image size)")
    if isinstance(sampling_ratio, float) or (isinstance(sampling_ratio, torch.Tensor)
                                             and sampling_ratio.is_floating_point()):
        raise ValueError(f"sampling_ratio: got {sampling_ratio!r}, expected an integer (<= 0: adaptive)")
    if int(sampling_ratio) > reference.MAX_SAMPLES_PER_AXIS:  # rows x cols points must stay within the kernel's int32
        raise ValueError(f"sampling_ratio: got {int(sampling_ratio)}, expected at most "
                         f"{reference.MAX_SAMPLES_PER_AXIS} points a side (<= 0: adaptive)")
    if boxes.dim() != 3 or boxes.shape[0] != tokens.shape[0] or boxes.shape[2] != 4:
        raise ValueError(f"boxes: got shape {tuple(boxes.shape)}, expected [{tokens.shape[0]}, R, 4]")
    for name, tensor in (("boxes", boxes), ("box_mask", box_mask)):
        if tensor is not None and tensor.device != tokens.device:
            raise ValueError(f"{name}: got device {tensor.device}, expected the tokens' device {tokens.device}")
    if box_mask is not None and (box_mask.shape != boxes.shape[:2] or box_mask.is_floating_point()):
        raise ValueError(f"box_mask: got shape {tuple(box_mask.shape)} of {box_mask.dtype}, expected "
                         f"{tuple(boxes.shape[:2])} bool (a mask, not weights)")


def _usable_boxes(boxes: torch.Tensor, box_mask: torch.Tensor | None) -> torch.Tensor:
    """`box_mask` with boxes holding a NaN/inf coordinate masked too, without a host sync: torchvision
    raises on them, and on a GPU their sample count would be garbage (a near-endless loop for inf)."""
    finite = torch.isfinite(boxes).all(dim=-1)
    return finite if box_mask is None else box_mask.bool() & finite


def chooses_triton(backend: str, tokens: torch.Tensor) -> bool:
    """'auto' takes Triton for CUDA tokens of a dtype it has kernels for, torch for the rest (a float64 gradcheck on
    a GPU included): only a backend asked for by name refuses what it cannot run."""
    return backend == "triton" or (backend == "auto" and tokens.is_cuda and tokens.dtype in SUPPORTED_DTYPES)


def region_pool(
    tokens: torch.Tensor,
    boxes: torch.Tensor,
    grid_hw: tuple[int, int],
    spatial_scale: float,
    box_mask: torch.Tensor | None = None,
    sampling_ratio: int = -1,
    normalize: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """1x1 RoIAlign (aligned=True) of each box on the token map, read in place as [B, H*W, C].

    Equals torchvision's roi_align on the NCHW view; masked boxes, and boxes with a NaN/inf coordinate
    (torchvision raises on those), give zero rows and no gradient; `normalize` L2-normalises the rows
    (F.normalize, eps 1e-12). Only `tokens` gets a gradient. `backend="auto"` runs Triton on CUDA
    tensors of its dtypes (fp32, bf16, fp16) and torch elsewhere. Unlike torchvision's, a NaN/inf token
    makes every unmasked row of its image non-finite (the pooling is a weighted sum over the whole map), and a box over 32768 map cells
    a side is sampled at 32768 points a side (`reference.MAX_SAMPLES_PER_AXIS`), and a fixed `sampling_ratio`
    over that is a ValueError.
    """
    # tokens: [B, H*W, C]; boxes: [B, R, 4] xyxy input pixels; box_mask: [B, R] bool -> [B, R, C]
    _check_inputs(tokens, boxes, grid_hw, spatial_scale, box_mask, sampling_ratio, backend)
    grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
    spatial_scale = float(spatial_scale)  # a one-element tensor of any shape or device: one number for both paths
    box_mask = _usable_boxes(boxes, box_mask)
    use_triton = chooses_triton(backend, tokens)
    if use_triton and tokens.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"tokens.dtype: got {tokens.dtype}, the triton backend expects one of {SUPPORTED_DTYPES}")
    if use_triton and not runs_on(tokens.device):
        raise ValueError(f"backend: got 'triton' for tokens on {tokens.device}, expected CUDA tensors "
                         "(or TRITON_INTERPRET=1 set before kernels.roi_pool is imported)")
    if not use_triton or boxes.shape[1] == 0 or tokens.shape[0] == 0 or tokens.shape[2] == 0:
        # Empty outputs go through torch too: no kernel launches on an empty grid, and autograd still links them.
        return region_pool_torch(tokens, boxes, grid_hw, spatial_scale, box_mask, sampling_ratio, normalize)
    return RegionPoolFunction.apply(tokens, boxes, box_mask, grid_hw, spatial_scale, int(sampling_ratio), normalize)


class RegionPool(nn.Module):
    """Module form of `region_pool` with the map geometry and options fixed at construction."""

    def __init__(self, grid_hw: tuple[int, int], spatial_scale: float, sampling_ratio: int = -1,
                 normalize: bool = False, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend: got {backend!r}, expected one of {BACKENDS}")
        # a non-sequence (RegionPool(6, ...)) is kept as given, for region_pool to name it
        self.grid_hw = tuple(grid_hw) if isinstance(grid_hw, (tuple, list, torch.Size, torch.Tensor)) else grid_hw
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.normalize = normalize
        self.backend = backend

    def forward(self, tokens: torch.Tensor, boxes: torch.Tensor, box_mask: torch.Tensor | None = None) -> torch.Tensor:
        # tokens: [B, H*W, C]; boxes: [B, R, 4] xyxy pixels; box_mask: [B, R] -> [B, R, C]
        return region_pool(tokens, boxes, self.grid_hw, self.spatial_scale, box_mask,
                           self.sampling_ratio, self.normalize, self.backend)

    def extra_repr(self) -> str:
        return (f"grid_hw={self.grid_hw}, spatial_scale={self.spatial_scale}, sampling_ratio={self.sampling_ratio}, "
                f"normalize={self.normalize}, backend={self.backend!r}")
