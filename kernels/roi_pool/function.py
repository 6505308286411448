"""The autograd Function of the Triton region pooling: factors and pooling forward, token gradient back."""
from __future__ import annotations

import torch

from kernels.roi_pool import launch


class RegionPoolFunction(torch.autograd.Function):
    """Saves only the small axis factors (and, when normalising, the output and norms) for backward.

    Masked boxes get exactly zero rows and pass on no gradient even where the image holds NaN/inf
    tokens or the upstream gradient of their rows is NaN: their zero weights alone would not do it."""

    @staticmethod
    def forward(
        ctx,
        tokens: torch.Tensor,
        boxes: torch.Tensor,
        box_mask: torch.Tensor,
        grid_hw: tuple[int, int],
        spatial_scale: float,
        sampling_ratio: int,
        normalize: bool,
        second_pass: bool | None = None,
    ) -> torch.Tensor:
        """`second_pass` as in `launch.pool_forward` (None: picked per launch; benchmarks force it)."""
        # tokens: [B, H*W, C]; boxes: [B, R, 4] xyxy pixels; box_mask: [B, R] bool -> [B, R, C]
        rows, cols = launch.region_factors(boxes, box_mask, grid_hw, spatial_scale, sampling_ratio)
        out, norms = launch.pool_forward(tokens, rows, cols, grid_hw, normalize, second_pass)
        # Zero weights times a NaN/inf token anywhere in the image are still NaN in the dot.
        out.masked_fill_(~box_mask[..., None], 0)
        if norms is not None:
            norms.masked_fill_(~box_mask, 0)
        ctx.grid_hw = grid_hw
        ctx.save_for_backward(rows, cols, out if normalize else None, norms, box_mask)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():  # backward(create_graph=True): the kernel's gradient has no graph
            raise RuntimeError("region_pool (triton backend) has no second-order gradient; use backend='torch' "
                               "for double backward")
        rows, cols, out, norms, box_mask = ctx.saved_tensors
        grad_tokens = None
        if ctx.needs_input_grad[0]:
            # masked boxes pass on no gradient, whatever arrives for them (0 * NaN)
            grad_out = grad_out.masked_fill(~box_mask[..., None], 0)
            pooled = grad_out if out is None else out  # only read when normalising
            grad_tokens = launch.pool_backward(grad_out, pooled, norms, rows, cols, ctx.grid_hw)
        return grad_tokens, None, None, None, None, None, None, None
