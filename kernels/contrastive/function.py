"""The autograd Function of the chunked contrastive loss and its distributed logic.

Write I = all images, T = all texts (N = world * b rows, rank r owning rows r*b..r*b+b-1) and
G = scale * I @ T^T, the N x N logits nobody stores. Rank r's loss needs
- image -> text: log-sum-exp over the row stripe G[r-rows, :], i.e. its images against all texts;
- text -> image: log-sum-exp over the column stripe G[:, r-cols], i.e. its texts against all images.
Rank r computes only its row stripe, tile by tile, and from each tile takes both row statistics and
column statistics. Column statistics over every rank's stripe are merged by a max + sum all-reduce
of O(N) floats, after which every column's text -> image log-sum-exp is known everywhere. So each
tile of G is built by exactly one rank and serves both directions. Only texts need gathering: images
are only ever anchors of their own rank's stripe. Each log-sum-exp is kept as (max, log sum exp(x - max)),
never added up, and each anchor's pair dot is taken from the forward tile that holds it (torch_chunked's
module doc says why).

Backward recomputes each tile, forms d(sum of all ranks' losses)/d(logits) for it (the row softmax
weighted by rank r's upstream gradient, the column softmax by the column owner's, less the label's 1 on the
pairs), and does
image_grad += dS @ T_tile and text_grad += dS^T @ I_tile: 1 GEMM forward and 3 backward per tile. The Triton
backward does so through cuBLAS on all of dS where it fits 1 GiB, and otherwise builds each tile once per
direction (4 backward) so that its programs never wait for each other (see triton_kernels.py). image_grad is
complete on its rank; text_grad holds rank r's share for all N texts and is
summed to the owners with one reduce-scatter (all-reduce on gloo), in fp32: with only the texts to
return, that is as many bytes as open_clip's half-precision returns of both towers. That is exactly what open_clip's
gather_with_grad gives: the gradient of rank r's features is d(sum over ranks of their losses)/d(them).
The logit-scale gradient is rank-local, d(own loss)/d(scale), as in open_clip; it comes from the
softmax-expected dot products gathered in the forward statistics, so it needs no extra pass.

Memory per rank beyond the inputs: the gathered texts [N, D] and their gradient [N, D] (in the features'
dtype, and an fp32 copy of it where several ranks sum it), the image gradient [b, D], O(b + N) statistics,
and one logits tile per program (registers on the GPU, a [tile x tile] block in torch). No logits, and
nothing else of size b x N beyond fixed caps: the Triton bf16 / fp32 backward holds d(loss)/d(logits) of all
rows up to 1 GiB, else of one stripe of rows, at most 256 MiB or 256 rows. (Triton's statistics take
3 x (column groups x b + row groups x N) partial floats, groups ~12 on an H100; its fp16 backward splits
each side's gradient over a few programs at small N, at most ~SMs x 64 partial rows.)
Ranks must hold the same number of rows b, as in open_clip (labels are rank * b + arange(b)); the forward checks
so with one small gather first, and every rank raises the same ValueError where they differ.
"""
from __future__ import annotations

import functools
from typing import Protocol

import torch
import torch.distributed as dist

from kernels.contrastive.collectives import (gather_rows, group_shape, merge_column_stats, reduce_to_owner,
                                             require_same_shape)
from kernels.contrastive.torch_chunked import ColumnMerge


class TilePasses(Protocol):
    """What a backend provides: the forward pass's statistics with the per-row loss terms, and the backward's
    gradients. The forward hands back finished quantities, not raw statistics, so that a backend can fuse the
    small element-wise work around its tile pass (the Triton one does: four launches where torch took dozens
    of small ops, which at a few thousand rows cost more than the tiles)."""

    def loss_terms(self, images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, row_valid: torch.Tensor,
                   col_valid: torch.Tensor, own_first: int,
                   merge_columns: ColumnMerge | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row log-sum-exps [2, b], column log-sum-exps [2, N] over every rank's rows, terms [2, b]): each
        log-sum-exp as (max, log sum exp(x - max)); per anchor row, its loss 0.5 * ((max_row - x) + log sum_row
        + (max_col - x) + log sum_col), x being scale * pair dot from the tile that gave the maxes, and its
        logit-scale gradient, 0 on masked rows. Anchor i's pair is text own_first + i; `merge_columns` combines
        the column statistics of all ranks' rows (None: one process)."""
        ...

    def grads(self, images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor,
              row_valid: torch.Tensor, col_valid: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor,
              row_coef: torch.Tensor, col_coef: torch.Tensor, own_first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients w.r.t. images [b, D] and texts [N, D] of sum(row_coef * row_lse) + sum(col_coef * col_lse)
        - 2 * scale * sum(row_coef * pair dot), in any float dtype, the log-sum-exps in `loss_terms`' two parts.
        Tiles recomputed as the forward built them give softmax weights exp((x - max) - log sum) whose pair entry
        is exp(-log sum) exactly where the pair is the top logit. Callers pass col_coef[own_first + i] ==
        row_coef[i] (both are this rank's upstream weight on a valid row); the Triton kernels take the text
        side's label coefficient from col_coef."""
        ...


class ContrastiveLossFunction(torch.autograd.Function):
    """Saves the features, gathered texts and O(b + N) statistics; never a logits block.

    Autocast is off inside both passes: the backward recomputes each tile, so forward and backward must take
    their logits in the same precision (the inputs' own, accumulated in fp32). Masked rows are zeroed
    on entry, so that whatever they hold (padding from torch.empty, NaN) reaches no valid row's
    statistics or gradient."""

    @staticmethod
    def forward(ctx, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                mask: torch.Tensor | None, group: dist.ProcessGroup | None, passes: TilePasses) -> torch.Tensor:
        # image_features, text_features: [b, D]; logit_scale: [] or [1]; mask: [b] bool or None (all valid) -> []
        with torch.autocast(image_features.device.type, enabled=False):
            return ContrastiveLossFunction._forward(ctx, image_features, text_features, logit_scale, mask, group,
                                                    passes)

    @staticmethod
    def _forward(ctx, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 mask: torch.Tensor | None, group: dist.ProcessGroup | None, passes: TilePasses) -> torch.Tensor:
        rank, world = group_shape(group)
        rows = image_features.shape[0]
        compute = torch.promote_types(image_features.dtype, torch.float32)
        scale = logit_scale.detach().reshape(()).to(compute)
        image_features, text_features = image_features.detach(), text_features.detach()
        given_mask = mask is not None
        if mask is None:  # every row valid: nothing to zero
            mask = torch.ones(rows, dtype=torch.bool, device=image_features.device)
        else:
            mask = mask.contiguous()  # the kernels read it as flat int8
            image_features = torch.where(mask[:, None], image_features, 0.0)  # a Python 0 keeps the dtype
            text_features = torch.where(mask[:, None], text_features, 0.0)
        if world > 1:  # every rank gathers masks, whether or not it was given one: the collectives pair up
            require_same_shape(image_features, group, world)
            all_valid = gather_rows(mask.to(torch.uint8), group, world).bool()  # gloo gathers no bool
            norm = world / all_valid.sum().clamp(min=1).to(compute)
        elif given_mask:
            all_valid, norm = mask, 1 / mask.sum().clamp(min=1).to(compute)
        else:  # 1 / b on the CPU: a CPU scalar tensor multiplies device ones without a launch
            all_valid, norm = mask, torch.tensor(1.0 / max(rows, 1), dtype=compute, device="cpu")
        all_texts = gather_rows(text_features, group, world)
        merge_columns = None if world == 1 else functools.partial(merge_column_stats, group=group, world=world)
        row_lse, col_lse, terms = passes.loss_terms(image_features, all_texts, scale, mask, all_valid, rank * rows,
                                                    merge_columns)
        sums = terms.sum(1) * norm
        loss, scale_grad = sums[0].clone(), sums[1]  # an output that is no view: callers may change it in place
        ctx.save_for_backward(image_features, text_features, all_texts, mask, all_valid, row_lse, col_lse,
                              scale, norm, scale_grad)
        ctx.group, ctx.passes, ctx.rank, ctx.world = group, passes, rank, world
        ctx.scale_shape, ctx.scale_dtype = logit_scale.shape, logit_scale.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        # the recomputed tiles and their products in the forward's precision, also where backward() runs inside an
        # autocast region
        with torch.autocast(grad_loss.device.type, enabled=False):
            return ContrastiveLossFunction._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss: torch.Tensor):
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
            per_rank = gather_rows(grad_loss.reshape(1), ctx.group, world) * (norm / 2)
            row_coef = torch.where(mask, per_rank[rank], 0.0)
            col_coef = row_coef if world == 1 else torch.where(all_valid, per_rank.repeat_interleave(rows), 0.0)
            image_grad, all_text_grad = ctx.passes.grads(image_features, all_texts, scale, mask, all_valid, row_lse,
                                                         col_lse, row_coef, col_coef, rank * rows)
            if world > 1:  # the ranks' shares are summed in fp32 (float64 ones in float64)
                all_text_grad = all_text_grad.to(torch.promote_types(all_text_grad.dtype, torch.float32))
            text_grad = reduce_to_owner(all_text_grad, ctx.group, rank, world).to(text_features.dtype)
            image_grad = image_grad.to(image_features.dtype)
        logit_scale_grad = None
        if ctx.needs_input_grad[2]:
            logit_scale_grad = (grad_loss * scale_grad).reshape(ctx.scale_shape).to(ctx.scale_dtype)
        return image_grad, text_grad, logit_scale_grad, None, None, None
