"""The autograd Function of the chunked contrastive loss and its distributed logic.

Write I = all images, T = all texts (N = world * b rows, rank r owning rows r*b..r*b+b-1) and
G = scale * I @ T^T, the N x N logits nobody stores. Rank r's loss needs
- image -> text: log-sum-exp over the row stripe G[r-rows, :], i.e. its images against all texts;
- text -> image: log-sum-exp over the column stripe G[:, r-cols], i.e. its texts against all images.
Rank r computes only its row stripe, tile by tile, and from each tile takes both row statistics and
column statistics. Column statistics over every rank's stripe are merged by a max + sum all-reduce
of O(N) floats, after which every column's text -> image log-sum-exp is known everywhere. So each
tile of G is built by exactly one rank and serves both directions. Only texts need gathering: images
are only ever anchors of their own rank's stripe.

Backward recomputes each tile, forms d(sum of all ranks' losses)/d(logits) for it (the row softmax
weighted by rank r's upstream gradient, the column softmax by the column owner's), and does
image_grad += dS @ T_tile and text_grad += dS^T @ I_tile. The torch backend builds each tile once per
pass (1 GEMM forward, 3 backward); the Triton backward builds it once per direction (1 forward, 4
backward) so that its programs never wait for each other (see triton_kernels.py). image_grad is complete on its rank;
text_grad holds rank r's share for all N texts and is
summed to the owners with one reduce-scatter (all-reduce on gloo), in fp32: with only the texts to
return, that is as many bytes as open_clip's half-precision returns of both towers. That is exactly what open_clip's
gather_with_grad gives: the gradient of rank r's features is d(sum over ranks of their losses)/d(them).
The logit-scale gradient is rank-local, d(own loss)/d(scale), as in open_clip; it comes from the
softmax-expected dot products gathered in the forward statistics, so it needs no extra pass.

Memory per rank beyond the inputs: the gathered texts [N, D] and their fp32 gradient [N, D] (the
size of the gathered features), the image gradient [b, D], O(b + N) statistics, and one logits tile
per program (registers on the GPU, a [tile x tile] block in torch). Nothing of size b x N. (Triton's
statistics take 3 x (column groups x b + row groups x N) partial floats, groups ~12 on an H100; its bf16 /
fp32 backward holds d(loss)/d(logits) of one stripe of rows, at most 256 MiB or 256 rows; its fp16
backward splits each side's gradient over a few programs at small N, at most ~SMs x 64 partial rows.)
Ranks must hold the same number of rows b, as in open_clip (labels are rank * b + arange(b)).
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist

from kernels.contrastive.collectives import gather_rows, group_shape, merge_column_stats, reduce_to_owner
from kernels.contrastive.torch_chunked import Stats, finish_stats


class TilePasses(Protocol):
    """What a backend provides: the forward statistics pass and the backward gradient pass."""

    def stats(self, images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor,
              row_valid: torch.Tensor, col_valid: torch.Tensor) -> tuple[Stats, Stats]: ...

    def grads(self, images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor,
              row_valid: torch.Tensor, col_valid: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor,
              row_coef: torch.Tensor, col_coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class ContrastiveLossFunction(torch.autograd.Function):
    """Saves the features, gathered texts and O(b + N) statistics; never a logits block.

    Autocast is off inside: the backward recomputes each tile, so forward and backward must take
    their logits in the same precision (the inputs' own, accumulated in fp32). Masked rows are zeroed
    on entry, so that whatever they hold (padding from torch.empty, NaN) reaches no valid row's
    statistics or gradient."""

    @staticmethod
    def forward(ctx, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                mask: torch.Tensor, group: dist.ProcessGroup | None, passes: TilePasses) -> torch.Tensor:
        # image_features, text_features: [b, D]; logit_scale: [] or [1]; mask: [b] bool -> []
        with torch.autocast(image_features.device.type, enabled=False):
            return ContrastiveLossFunction._forward(ctx, image_features, text_features, logit_scale, mask, group,
                                                    passes)

    @staticmethod
    def _forward(ctx, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 mask: torch.Tensor, group: dist.ProcessGroup | None, passes: TilePasses) -> torch.Tensor:
        image_features = torch.where(mask[:, None], image_features.detach(), 0.0)  # a Python 0 keeps the dtype
        text_features = torch.where(mask[:, None], text_features.detach(), 0.0)
        rank, world = group_shape(group)
        rows = image_features.shape[0]
        compute = torch.promote_types(image_features.dtype, torch.float32)
        scale = logit_scale.detach().reshape(()).to(compute)
        all_texts = gather_rows(text_features.detach(), group, world)
        all_valid = gather_rows(mask.to(torch.uint8), group, world).bool()  # gloo gathers no bool
        row_stats, col_stats = passes.stats(image_features.detach(), all_texts, scale, mask, all_valid)
        row_lse, row_expected = finish_stats(row_stats)
        col_lse, col_expected = finish_stats(merge_column_stats(col_stats, group, world))
        own = slice(rank * rows, (rank + 1) * rows)
        # dot of each anchor with its own pair: the label logit of both directions
        pair_dot = (image_features.detach().to(compute) * text_features.detach().to(compute)).sum(-1)
        norm = world / all_valid.sum().clamp(min=1).to(compute)
        per_row = 0.5 * (row_lse.to(compute) + col_lse[own].to(compute)) - scale * pair_dot
        loss = torch.where(mask, per_row, 0.0).sum() * norm
        scale_grad = torch.where(mask, 0.5 * (row_expected + col_expected[own]).to(compute) - pair_dot, 0.0)
        ctx.save_for_backward(image_features, text_features, all_texts, mask, all_valid, row_lse, col_lse,
                              scale, norm, scale_grad.sum() * norm)
        ctx.group, ctx.passes, ctx.rank, ctx.world = group, passes, rank, world
        ctx.scale_shape, ctx.scale_dtype = logit_scale.shape, logit_scale.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        if torch.is_grad_enabled():  # backward(create_graph=True): the tile passes build no graph
            raise RuntimeError("contrastive_loss has no second-order gradient (backward with create_graph=True); "
                               "open_clip's ClipLoss does")
        (image_features, text_features, all_texts, mask, all_valid, row_lse, col_lse,
         scale, norm, scale_grad) = ctx.saved_tensors
        rank, world, rows = ctx.rank, ctx.world, image_features.shape[0]
        grad_loss = grad_loss.detach().reshape(()).to(scale.dtype)
        image_grad = text_grad = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            # every rank's upstream gradient weights its texts' column terms, which all ranks touch
            per_rank = gather_rows(grad_loss.reshape(1), ctx.group, world) * norm / 2
            row_coef = torch.where(mask, per_rank[rank], 0.0)
            col_coef = torch.where(all_valid, per_rank.repeat_interleave(rows), 0.0)
            image_grad, all_text_grad = ctx.passes.grads(
                image_features, all_texts, scale, mask, all_valid, row_lse, col_lse, row_coef, col_coef)
            # the label logit appears in both directions with weight -1 each
            pair_coef = (scale * 2 * row_coef).unsqueeze(1)
            own = slice(rank * rows, (rank + 1) * rows)
            image_grad = image_grad - pair_coef * text_features.to(image_grad.dtype)
            all_text_grad[own] -= pair_coef * image_features.to(all_text_grad.dtype)
            text_grad = reduce_to_owner(all_text_grad, ctx.group, rank, world).to(text_features.dtype)
            image_grad = image_grad.to(image_features.dtype)
        logit_scale_grad = None
        if ctx.needs_input_grad[2]:
            logit_scale_grad = (grad_loss * scale_grad).reshape(ctx.scale_shape).to(ctx.scale_dtype)
        return image_grad, text_grad, logit_scale_grad, None, None, None
