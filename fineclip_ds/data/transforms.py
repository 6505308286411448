"""Image + boxes -> model-ready tensors, with every dropped box counted by reason.

Images are resized to the model's input size without cropping, so that no box is cut off by a
centre crop; boxes are scaled with the image. A bad box is dropped and counted, never fatal.
"""
from __future__ import annotations

import math
import numbers
from collections import Counter
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from fineclip_ds.data.images import to_rgb
from fineclip_ds.sizes import height_width

MIN_BOX_SIDE_PX = 1.0  # at model resolution: thinner boxes pool less than one token's worth


def as_number(value: Any) -> float | None:
    """A JSON or numpy value as a float: None when it is not a number ("12", None, True); inf for an integer
    past float range (JSON integers have no size limit: 1 followed by 400 zeros)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf


def validate_boxes(boxes: Sequence[Any] | np.ndarray | torch.Tensor, width: int,
                   height: int) -> tuple[list[list[float]], list[int], Counter]:
    """Keep boxes that overlap the image (clipped to it); returns (kept, their indices, drops by reason).

    `boxes` as JSON gives them (lists), or as a detector does (a numpy array or tensor, or a list of them)."""
    kept: list[list[float]] = []
    kept_index: list[int] = []
    drops: Counter = Counter()
    for index, box in enumerate(boxes.tolist() if isinstance(boxes, (np.ndarray, torch.Tensor)) else boxes):
        if isinstance(box, (np.ndarray, torch.Tensor)):
            box = box.tolist()
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            drops["box_malformed"] += 1
            continue
        values = [as_number(v) for v in box]
        if None in values:
            drops["box_malformed"] += 1
            continue
        if not all(math.isfinite(v) for v in values):
            drops["box_not_finite"] += 1
            continue
        x1, y1, x2, y2 = values
        if x2 <= x1 or y2 <= y1:
            drops["box_non_positive"] += 1
            continue
        x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
        if x2 <= x1 or y2 <= y1:
            drops["box_outside"] += 1
            continue
        kept.append([x1, y1, x2, y2])
        kept_index.append(index)
    return kept, kept_index, drops


class RegionTransform:
    """PIL image + xyxy pixel boxes -> (normalised [3, H, W] tensor, [k, 4] boxes at H x W, kept indices, drops)."""

    def __init__(self, image_size: int | Sequence[int], mean: Sequence[float], std: Sequence[float],
                 crop_source_scale: int = 1):
        self.height, self.width = height_width(image_size)
        self.mean = list(mean)
        self.std = list(std)
        self.crop_source_scale = crop_source_scale

    def crop_source(self, image: Image.Image) -> torch.Tensor | None:
        """The image at crop_source_scale x the model's size, for self-distillation crops; None at scale 1
        (crops then come from the model input itself)."""
        # -> [3, s*H, s*W] normalised
        if self.crop_source_scale == 1:
            return None
        size = [self.height * self.crop_source_scale, self.width * self.crop_source_scale]
        resized = TF.resize(to_rgb(image), size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        return TF.normalize(TF.to_tensor(resized), self.mean, self.std)

    def __call__(self, image: Image.Image, boxes: Sequence[Sequence[float]]) -> tuple[torch.Tensor, torch.Tensor, list[int], Counter]:
        width, height = image.size
        kept, kept_index, drops = validate_boxes(boxes, width, height)
        resized = TF.resize(to_rgb(image), [self.height, self.width],
                            interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        tensor = TF.normalize(TF.to_tensor(resized), self.mean, self.std)
        scale = torch.tensor([self.width / width, self.height / height] * 2)
        scaled = torch.tensor(kept, dtype=torch.float32).reshape(-1, 4) * scale
        large_enough = ((scaled[:, 2:] - scaled[:, :2]) >= MIN_BOX_SIDE_PX).all(dim=1)
        if not bool(large_enough.all()):
            drops["box_too_small"] += int((~large_enough).sum())
            kept_index = [index for index, keep in zip(kept_index, large_enough.tolist()) if keep]
            scaled = scaled[large_enough]
        return tensor, scaled, kept_index, drops
