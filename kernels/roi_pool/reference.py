"""The torch path of region pooling: RoIAlign (1x1, aligned=True) as separable per-axis weights.

A 1x1 RoIAlign output is the mean over a grid of sampling points of bilinear interpolations, and
every rule torchvision applies to a point (drop it outside [-1, H] x [-1, W], clamp it to the map,
snap to the last row/column) acts on y and x separately. So the weight of token (h, w) for one box
is `row[h] * col[w]`, with `row` summing the y-weights of all sampling rows (divided by the point
count) and `col` the x-weights. This module computes those factors in torch, and pools with one
batched matmul; the Triton kernels compute the same factors and never build the [B, R, H*W] matrix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NORMALIZE_EPS = 1e-12
# torchvision samples ceil(box size in cells) points per axis; capped here, so that an absurd finite box
# (1e30 px) does not loop ~2**31 times on a GPU (the float -> int cast saturates there) and the point
# count of a box (rows x cols) stays within int32 in the kernel. Boxes under 32768 cells a side are exact.
MAX_SAMPLES_PER_AXIS = 2**15


def axis_factors(start: torch.Tensor, size: torch.Tensor, points: torch.Tensor, length: int) -> torch.Tensor:
    """Summed bilinear weights of `points` evenly spaced samples in [start, start + size) per pixel.

    Follows torchvision's bilinear_interpolate on one axis: a sample beyond [-1, length] weighs
    nothing, one in [-1, 0] is moved to 0, one past length - 1 is snapped onto the last pixel.
    """
    # start, size: [N] float grid coordinates; points: [N] int >= 0 -> [N, length]
    pixels = torch.arange(length, device=start.device)
    factors = start.new_zeros(start.shape[0], length)
    spacing = size / points.clamp_min(1)
    for index in range(int(points.max()) if points.numel() else 0):
        position = start + (index + 0.5) * spacing
        inside = (position >= -1) & (position <= length) & (index < points)
        position = position.clamp(0, length)
        low = position.floor().long()
        at_edge = low >= length - 1
        low = torch.where(at_edge, torch.full_like(low, length - 1), low)
        high = torch.where(at_edge, low, low + 1)
        frac = torch.where(at_edge, torch.zeros_like(position), position - low)
        w_low = torch.where(inside, 1 - frac, torch.zeros_like(frac))
        w_high = torch.where(inside, frac, torch.zeros_like(frac))
        factors += (pixels == low[:, None]) * w_low[:, None] + (pixels == high[:, None]) * w_high[:, None]
    return factors


def region_factors(
    boxes: torch.Tensor,
    box_mask: torch.Tensor | None,
    grid_hw: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column factors of every box; masked boxes get zero factors, so zero output and gradient."""
    # boxes: [B, R, 4] xyxy pixels; box_mask: [B, R] bool -> rows [B, R, H], cols [B, R, W] (1/count in rows)
    batch, regions = boxes.shape[:2]
    height, width = grid_hw
    flat = boxes.reshape(-1, 4).to(torch.float64)  # fp64 sample counts and positions, as the float64 contract
    x1, y1, x2, y2 = (flat[:, i] * spatial_scale - 0.5 for i in range(4))
    valid = torch.ones_like(x1, dtype=torch.bool) if box_mask is None else box_mask.reshape(-1).bool()

    def sample_points(size: torch.Tensor) -> torch.Tensor:
        adaptive = size.clamp(0, MAX_SAMPLES_PER_AXIS).ceil().long()
        points = adaptive if sampling_ratio <= 0 else torch.full_like(adaptive, sampling_ratio)
        return torch.where(valid, points, torch.zeros_like(points))

    rows_points, cols_points = sample_points(y2 - y1), sample_points(x2 - x1)
    count = (rows_points * cols_points).clamp_min(1)
    rows = axis_factors(y1, y2 - y1, rows_points, height) / count[:, None]
    cols = axis_factors(x1, x2 - x1, cols_points, width)
    return rows.view(batch, regions, height), cols.view(batch, regions, width)


def region_pool_torch(
    tokens: torch.Tensor,
    boxes: torch.Tensor,
    grid_hw: tuple[int, int],
    spatial_scale: float,
    box_mask: torch.Tensor | None = None,
    sampling_ratio: int = -1,
    normalize: bool = False,
) -> torch.Tensor:
    """Region pooling in plain torch (autograd gives the token gradient; matmul keeps it deterministic).

    It materialises the [B, R, H*W] weights and an fp32 copy of the tokens: this is the CPU and
    fallback path, chosen for clarity, not memory. Autocast is off inside, so that under it the sum
    is still taken in fp32 like the Triton kernel's (and torchvision's).
    """
    # tokens: [B, H*W, C]; boxes: [B, R, 4] xyxy pixels; box_mask: [B, R] -> [B, R, C]
    with torch.no_grad():
        rows, cols = region_factors(boxes.detach(), box_mask, grid_hw, spatial_scale, sampling_ratio)
    compute_dtype = torch.promote_types(tokens.dtype, torch.float32)
    with torch.autocast(tokens.device.type, enabled=False):
        weights = (rows[..., :, None] * cols[..., None, :]).flatten(2).to(compute_dtype)
        pooled = torch.bmm(weights, tokens.to(compute_dtype))
        if box_mask is not None:  # zero weights times a NaN/inf token are NaN: masked rows are zero anyway
            pooled = torch.where(box_mask.bool()[..., None], pooled, 0.0)
        if normalize:
            pooled = F.normalize(pooled, dim=-1, eps=NORMALIZE_EPS)
    return pooled.to(tokens.dtype)
