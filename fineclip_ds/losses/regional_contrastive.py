"""L_RC: region features against the text embeddings of their region captions, as an InfoNCE."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fineclip_ds.losses.distributed import all_reduce_max
from kernels import contrastive_loss


class RegionalContrastiveLoss(nn.Module):
    """Both directions, negatives across all valid regions of all ranks, padded boxes masked out.

    Ranks hold different numbers of box slots (B x R with R the per-batch maximum), so rows are padded
    to the largest count over ranks before the gather; padding rows are masked like absent boxes.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, backend: str = "auto"):
        super().__init__()
        self.group = group
        self.backend = backend

    def forward(
        self, region_features: torch.Tensor, region_text_embeddings: torch.Tensor, box_mask: torch.Tensor,
        logit_scale: torch.Tensor,
    ) -> torch.Tensor:
        # region_features, region_text_embeddings: [B, R, D]; box_mask: [B, R]; logit_scale: [1]
        dim = region_features.shape[-1]
        regions = region_features.reshape(-1, dim)
        texts = region_text_embeddings.reshape(-1, dim)
        mask = box_mask.reshape(-1)
        pad = all_reduce_max(mask.numel(), mask.device, self.group) - mask.numel()
        if pad:
            regions = F.pad(regions, (0, 0, 0, pad))
            texts = F.pad(texts, (0, 0, 0, pad))
            mask = F.pad(mask, (0, pad), value=False)
        return contrastive_loss(regions, texts, logit_scale, mask=mask, group=self.group, backend=self.backend)
