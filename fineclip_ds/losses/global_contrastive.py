"""L_GC: CLIP's symmetric image-text InfoNCE over the global batch, learnable temperature."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from kernels import contrastive_loss


class GlobalContrastiveLoss(nn.Module):
    """Through the chunked kernel (`kernels.contrastive_loss`): no B x N logits, either backend."""

    def __init__(self, group: dist.ProcessGroup | None = None, backend: str = "auto"):
        super().__init__()
        self.group = group
        self.backend = backend

    def forward(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        # image_embeddings, text_embeddings: [B, D] normalised; logit_scale: [1] multiplier
        return contrastive_loss(image_embeddings, text_embeddings, logit_scale, group=self.group, backend=self.backend)
