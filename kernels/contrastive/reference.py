"""Naive symmetric InfoNCE that materialises the full logits: the float64 yardstick for the tiled op.

It takes every rank's rows at once and returns every rank's loss, so one process can check the
distributed contract (rank-local anchors, all gathered rows as negatives, validity mask, the
world / total-valid scaling) without starting any process group.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_losses(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    world: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-rank losses; rank r holds rows [r*b, (r+1)*b) of the global batch."""
    # image_features, text_features: [w*b, D] in rank order; logit_scale: [] or [1]; mask: [w*b] bool -> [w]
    total = image_features.shape[0]
    rows = total // world
    if mask is None:
        mask = torch.ones(total, dtype=torch.bool, device=image_features.device)
    excluded = torch.zeros(total, dtype=image_features.dtype, device=image_features.device)
    excluded = excluded.masked_fill(~mask, float("-inf"))
    scale = logit_scale.reshape(())
    logits_per_image = scale * image_features @ text_features.T + excluded
    logits_per_text = scale * text_features @ image_features.T + excluded
    labels = torch.arange(total, device=image_features.device)
    safe = mask.unsqueeze(1)  # masked rows would be all -inf; give them finite logits, then drop them
    per_row = (
        F.cross_entropy(torch.where(safe, logits_per_image, 0.0), labels, reduction="none")
        + F.cross_entropy(torch.where(safe, logits_per_text, 0.0), labels, reduction="none")
    ) / 2
    per_row = torch.where(mask, per_row, 0.0)
    total_valid = mask.sum().clamp(min=1)
    return per_row.view(world, rows).sum(dim=1) * world / total_valid
