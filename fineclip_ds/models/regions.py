"""Region operations on image tensors and dense token maps: RoIAlign pooling and teacher crops."""
from __future__ import annotations

import torch
from torchvision.ops import roi_align

from kernels import region_pool


def pool_regions(
    dense: torch.Tensor,
    boxes: torch.Tensor,
    grid_hw: tuple[int, int],
    spatial_scale: float,
    box_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """RoIAlign (1x1, adaptive sampling, aligned=True) of each box on the token map, L2-normalised.

    The fused kernel (`kernels.region_pool`, Triton on CUDA, torch elsewhere or by `backend`) reads
    the map as the model holds it, so no NCHW copy is made. Boxes stay in their own (fp32) dtype: in
    bf16 a coordinate near 500 px would be rounded to a multiple of 2 px.
    dense: [B, h*w, D]; boxes: [B, R, 4] xyxy input pixels; box_mask: [B, R] -> [B, R, D], masked rows 0.
    """
    return region_pool(dense, boxes, grid_hw, spatial_scale, box_mask=box_mask, normalize=True,
                       backend=backend)


def enlarge_boxes(boxes: torch.Tensor, factor: float, image_hw: tuple[int, int]) -> torch.Tensor:
    """Scale boxes about their centres by `factor`, clipped to the image. boxes: [..., 4] xyxy."""
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2
    half = (boxes[..., 2:] - boxes[..., :2]) * factor / 2
    upper = boxes.new_tensor([image_hw[1], image_hw[0]])
    top_left = torch.maximum(centre - half, torch.zeros_like(centre))
    bottom_right = torch.minimum(centre + half, upper)
    return torch.cat([top_left, bottom_right], dim=-1)


def crop_regions(
    images: torch.Tensor, boxes: torch.Tensor, box_mask: torch.Tensor, enlarge: float, out_hw: tuple[int, int]
) -> torch.Tensor:
    """Crops of every valid box, enlarged and resized to the model's input size (the teacher's view).

    images: [B, 3, H, W]; boxes: [B, R, 4] xyxy pixels; box_mask: [B, R] -> [n_valid, 3, *out_hw],
    in row-major (b, r) order of the valid boxes, in the images' dtype. Adaptive RoIAlign sampling
    averages several points per output pixel, so large boxes are downsampled without aliasing.
    Crops are taken in fp32 (or fp64): torchvision's roi_align has no bf16 kernel on CPU or CUDA, and
    half-precision box coordinates would be rounded (bf16 steps are 2 px near 500 px).
    """
    crop_boxes = enlarge_boxes(boxes, enlarge, images.shape[-2:])
    compute_dtype = torch.promote_types(images.dtype, torch.float32)
    batch_index = torch.arange(images.shape[0], device=images.device).unsqueeze(1).expand_as(box_mask)
    rois = torch.cat([batch_index[box_mask].unsqueeze(1), crop_boxes[box_mask]], dim=1).to(compute_dtype)
    crops = roi_align(images.to(compute_dtype), rois, output_size=out_hw, spatial_scale=1.0, sampling_ratio=-1,
                      aligned=True)
    return crops.to(images.dtype)
