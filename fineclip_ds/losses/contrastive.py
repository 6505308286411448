"""Symmetric InfoNCE over the global batch with an optional validity mask (naive torch path).

Same contract as `kernels.contrastive_loss`: rank-local anchors against all ranks' rows, features
gathered with gradient, value scaled so that its average over ranks is the mean over all valid rows.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fineclip_ds.losses.distributed import all_reduce_sum, rank, world_size


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for our rows (all_reduce: gloo has no
    reduce_scatter) and returns our slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        ctx.rows = tensor.shape[0]
        gathered = [torch.empty_like(tensor) for _ in range(world_size(group))]
        dist.all_gather(gathered, tensor.contiguous(), group=group)
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = rank(ctx.group) * ctx.rows
        return grad[start:start + ctx.rows], None


def gather_with_grad(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    if world_size(group) == 1:
        return tensor
    return _GatherWithGrad.apply(tensor, group)


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    mask: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    # image_features, text_features: [b, D] normalised; logit_scale: [] or [1]; mask: [b] bool
    rows = image_features.shape[0]
    if mask is None:
        mask = torch.ones(rows, dtype=torch.bool, device=image_features.device)
    all_images = gather_with_grad(image_features, group)
    all_texts = gather_with_grad(text_features, group)
    all_mask = gather_with_grad(mask.to(image_features.dtype), group).bool()
    labels = rank(group) * rows + torch.arange(rows, device=image_features.device)
    excluded = torch.zeros_like(all_mask, dtype=image_features.dtype).masked_fill(~all_mask, float("-inf"))
    scale = logit_scale.reshape(())
    logits_per_image = scale * image_features @ all_texts.T + excluded
    logits_per_text = scale * text_features @ all_images.T + excluded
    per_row = (
        F.cross_entropy(logits_per_image[mask], labels[mask], reduction="none")
        + F.cross_entropy(logits_per_text[mask], labels[mask], reduction="none")
    ) / 2
    total_valid = all_reduce_sum(mask.sum().to(torch.float32), group)
    if total_valid.item() == 0:
        return (image_features.sum() + text_features.sum()) * 0.0 + logit_scale.sum() * 0.0
    return per_row.sum() * world_size(group) / total_valid
