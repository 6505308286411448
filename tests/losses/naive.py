"""Float64 loop-level formulas the losses are checked against (deliberately written differently)."""
from __future__ import annotations

import math

import torch


def naive_infonce(images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over valid anchors i of (-log p(t_i | v_i) - log p(v_i | t_i)) / 2, over valid candidates only."""
    rows = images.shape[0]
    valid = [i for i in range(rows) if mask is None or bool(mask[i])]
    total = images.new_zeros(())
    for i in valid:
        to_texts = torch.stack([scale * images[i].dot(texts[j]) for j in valid])
        to_images = torch.stack([scale * texts[i].dot(images[j]) for j in valid])
        k = valid.index(i)
        total = total - (to_texts[k] - torch.logsumexp(to_texts, 0)) / 2 - (to_images[k] - torch.logsumexp(to_images, 0)) / 2
    return total / max(len(valid), 1)


def naive_self_distillation(regions: torch.Tensor, teachers: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    losses = []
    t = 0
    for b in range(mask.shape[0]):
        for r in range(mask.shape[1]):
            if mask[b, r]:
                cos = regions[b, r].dot(teachers[t]) / (regions[b, r].norm() * teachers[t].norm())
                losses.append(1 - cos)
                t += 1
    return torch.stack(losses).mean()


def unit_rows(*shape: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True)).requires_grad_(True)


LN100 = math.log(100)
