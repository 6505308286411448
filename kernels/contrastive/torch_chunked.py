"""The tiled algorithm in plain torch, one [tile x tile] block of logits at a time (CPU, or any device
without Triton): the same statistics and recomputing backward as the Triton kernels. Its backward builds
each tile once and uses it for both gradients, as the Triton one does where d(loss)/d(dot) of all rows fits
its 1 GiB (beyond, the Triton one builds each tile once per direction, so that its programs never wait for
each other).

Statistics are triples (max, sum of exp(x - max), sum of exp(x - max) * dot) over the valid entries
of a row or column, where x = scale * dot. The third member gives the softmax-expected dot product,
which is what the logit-scale gradient needs, so that gradient costs no extra pass.

A finished log-sum-exp stays in two parts, [2, n] = (max, log sum exp(x - max)), never their sum: at a
logit scale of 100 that sum is ~100, whose fp32 rounding (ulp 7.6e-6) is as large as a confident pair's
loss. The loss takes (max - x_pair) + log sum, with x_pair from the very tile that gave the max (exactly 0
where the pair is the top logit, as in open_clip's cross-entropy), and the backward's softmax
exp((x - max) - log sum).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

Stats = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# Merges one rank's column statistics with every other rank's (collectives.merge_column_stats).
ColumnMerge = Callable[[Stats], Stats]


def empty_stats(size: int, device: torch.device, dtype: torch.dtype) -> Stats:
    # -> ([size], [size], [size])
    return (torch.full((size,), float("-inf"), device=device, dtype=dtype),
            torch.zeros(size, device=device, dtype=dtype), torch.zeros(size, device=device, dtype=dtype))


def finite_or_zero(values: torch.Tensor) -> torch.Tensor:
    """Shift for exp(): the max itself, or 0 where nothing was seen (-inf), so exp never sees inf - inf."""
    return torch.where(torch.isneginf(values), 0.0, values)


def merge_stats(first: Stats, second: Stats) -> Stats:
    """Online log-sum-exp merge of two partial statistics over disjoint sets of entries."""
    # each member: [n] -> [n]
    top = torch.maximum(first[0], second[0])
    shift = finite_or_zero(top)
    weight_first, weight_second = torch.exp(first[0] - shift), torch.exp(second[0] - shift)
    return (top, first[1] * weight_first + second[1] * weight_second,
            first[2] * weight_first + second[2] * weight_second)


def tile_stats(dot: torch.Tensor, logits: torch.Tensor, dim: int) -> Stats:
    """Statistics of one tile along `dim`; excluded entries hold -inf logits."""
    # dot, logits: [m, n] -> members: [n] (dim=0) or [m] (dim=1)
    top = logits.amax(dim)
    weights = torch.exp(logits - finite_or_zero(top).unsqueeze(dim))
    return top, weights.sum(dim), (weights * dot).sum(dim)


def finish_stats(stats: Stats) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp in two parts (max, log sum) and softmax-expected dot; 0 for rows that saw no valid entry
    (never used, never NaN).

    A row that saw anything has a sum of at least 1 (its max contributes exp(0)); a sum of exactly 0
    means nothing was seen. A NaN sum (a NaN or +inf logit) stays NaN: `total > 0` read it as unseen
    and set its log-sum-exp to 0, so a NaN negative from another rank gave this rank a finite loss."""
    # members: [n] -> lse: [2, n] (max, log sum), expected_dot: [n]
    top, total, weighted_dot = stats
    seen = total != 0
    safe_total = torch.where(seen, total, 1.0)
    lse = torch.where(seen, torch.stack([finite_or_zero(top), torch.log(safe_total)]), 0.0)
    return lse, torch.where(seen, weighted_dot / safe_total, 0.0)


def loss_terms_of(row_stats: Stats, col_stats: Stats, pair_dot: torch.Tensor, scale: torch.Tensor,
                  row_valid: torch.Tensor, own_first: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row and column log-sum-exps (max, log sum) and the per-row terms [loss, logit-scale gradient] from
    complete statistics: 0.5 * ((max_row - x) + log sum_row + (max_col - x) + log sum_col) with x = scale *
    pair dot, and 0.5 * (expected_row + expected_col) - pair dot, 0 on masked rows. Anchor i's pair is text
    own_first + i of the gathered texts; `pair_dot` is the one its tile held, so x - max is exact."""
    # row members: [b]; col members: [N]; pair_dot: [b] -> [2, b], [2, N], [2, b]
    row_lse, row_expected = finish_stats(row_stats)
    col_lse, col_expected = finish_stats(col_stats)
    own = slice(own_first, own_first + pair_dot.shape[0])
    pair_logit = scale * pair_dot
    terms = torch.stack([0.5 * ((row_lse[0] - pair_logit) + row_lse[1] + (col_lse[0, own] - pair_logit)
                                + col_lse[1, own]),
                         0.5 * (row_expected + col_expected[own]) - pair_dot])
    return row_lse, col_lse, torch.where(row_valid, terms, 0.0)


class TorchTiles:
    """Tile passes in torch; at most one [tile x tile] logits block is alive at a time."""

    def __init__(self, tile: int = 2048):
        if tile < 1:
            raise ValueError(f"tile: got {tile}, expected a positive number of rows")
        self.tile = tile

    def _logits(self, images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor,
                row_valid: torch.Tensor, col_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # images: [m, D]; texts: [n, D]; row_valid: [m]; col_valid: [n] -> dot, logits: [m, n]
        compute = torch.promote_types(images.dtype, torch.float32)
        dot = images.to(compute) @ texts.to(compute).T
        keep = row_valid.unsqueeze(1) & col_valid.unsqueeze(0)
        return dot, torch.where(keep, dot * scale, float("-inf"))

    def stats(self, images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, row_valid: torch.Tensor,
              col_valid: torch.Tensor, own_first: int) -> tuple[Stats, Stats, torch.Tensor]:
        """Row (image -> text) and column (text -> image) statistics from one pass over the tiles, and each
        anchor's pair dot (image i with text own_first + i) as the tile that holds it computed it."""
        # images: [b, D] local; texts: [N, D] gathered; scale: []; row_valid: [b]; col_valid: [N]
        # -> row members: [b], col members: [N], pair_dot: [b]
        compute = torch.promote_types(images.dtype, torch.float32)
        rows, cols = images.shape[0], texts.shape[0]
        row_stats = empty_stats(rows, images.device, compute)
        col_stats = empty_stats(cols, images.device, compute)
        pair_dot = torch.zeros(rows, device=images.device, dtype=compute)
        for r0 in range(0, rows, self.tile):
            r1 = min(r0 + self.tile, rows)
            block_row = empty_stats(r1 - r0, images.device, compute)
            for c0 in range(0, cols, self.tile):
                c1 = min(c0 + self.tile, cols)
                dot, logits = self._logits(images[r0:r1], texts[c0:c1], scale, row_valid[r0:r1], col_valid[c0:c1])
                block_row = merge_stats(block_row, tile_stats(dot, logits, dim=1))
                first, last = max(r0, c0 - own_first), min(r1, c1 - own_first)  # rows whose pair is in this tile
                if first < last:
                    pair_dot[first:last] = dot.diagonal(own_first + r0 - c0)
                merged = merge_stats(tuple(s[c0:c1] for s in col_stats), tile_stats(dot, logits, dim=0))
                for target, value in zip(col_stats, merged):
                    target[c0:c1] = value
            for target, value in zip(row_stats, block_row):
                target[r0:r1] = value
        return row_stats, col_stats, pair_dot

    def loss_terms(self, images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, row_valid: torch.Tensor,
                   col_valid: torch.Tensor, own_first: int,
                   merge_columns: ColumnMerge | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row and column log-sum-exps and the per-row loss terms (see function.TilePasses)."""
        row_stats, col_stats, pair_dot = self.stats(images, texts, scale, row_valid, col_valid, own_first)
        if merge_columns is not None:
            col_stats = merge_columns(col_stats)
        return loss_terms_of(row_stats, col_stats, pair_dot, scale, row_valid, own_first)

    def grads(self, images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor,
              row_valid: torch.Tensor, col_valid: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor,
              row_coef: torch.Tensor, col_coef: torch.Tensor, own_first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients w.r.t. images and texts of sum(row_coef * lse_row) + sum(col_coef * lse_col)
        - 2 * scale * sum(row_coef * pair dot), image i's pair being text own_first + i; the log-sum-exps come
        in two parts (max, log sum), as `loss_terms` gives them.

        Each tile is recomputed (1 GEMM) as `stats` built it, so x - max is bitwise the forward's, turned into
        d(loss)/d(dot) and used twice (2 GEMMs). The pairs' label term goes into d(loss)/d(dot), where a confident
        pair's softmax - 1 cancels in the compute dtype as in open_clip's cross-entropy: subtracted after the
        products, it cancelled against their rounding (2.8x open_clip's gradient error at logit scale 100).
        """
        # images: [b, D]; texts: [N, D]; row_lse: [2, b]; col_lse: [2, N]; row_coef: [b]; col_coef: [N]
        # -> image_grad: [b, D], text_grad: [N, D]
        compute = torch.promote_types(images.dtype, torch.float32)
        rows, cols = images.shape[0], texts.shape[0]
        image_grad = torch.zeros(images.shape, device=images.device, dtype=compute)
        text_grad = torch.zeros(texts.shape, device=texts.device, dtype=compute)
        for r0 in range(0, rows, self.tile):
            r1 = min(r0 + self.tile, rows)
            for c0 in range(0, cols, self.tile):
                c1 = min(c0 + self.tile, cols)
                _, logits = self._logits(images[r0:r1], texts[c0:c1], scale, row_valid[r0:r1], col_valid[c0:c1])
                grad_logits = (row_coef[r0:r1, None] * torch.exp((logits - row_lse[0, r0:r1, None])
                                                                  - row_lse[1, r0:r1, None])
                               + col_coef[None, c0:c1] * torch.exp((logits - col_lse[0, None, c0:c1])
                                                                   - col_lse[1, None, c0:c1]))
                first, last = max(r0, c0 - own_first), min(r1, c1 - own_first)  # rows whose pair is in this tile
                if first < last:
                    grad_logits.diagonal(own_first + r0 - c0).sub_(2 * row_coef[first:last])
                grad_dot = grad_logits * scale
                image_grad[r0:r1] += grad_dot @ texts[c0:c1].to(compute)
                text_grad[c0:c1] += grad_dot.T @ images[r0:r1].to(compute)
        return image_grad, text_grad
