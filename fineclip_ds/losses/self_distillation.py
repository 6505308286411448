"""L_SD: region features pulled towards the same model's global embedding of the region crop."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fineclip_ds.losses.distributed import all_reduce_sum, world_size


class SelfDistillationLoss(nn.Module):
    """Mean over all valid regions of all ranks of 1 - cos(region feature, crop embedding).

    The rank-local value is sum(1 - cos) * world / (valid regions on all ranks), so that averaging
    gradients over ranks (what DeepSpeed does) gives the exact global mean whatever the number of
    regions each rank holds. With no valid region anywhere it is 0 (an empty sum) with zero gradients;
    the count is clamped rather than tested on the host, which would stall the GPU queue mid-forward.
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        super().__init__()
        self.group = group

    def forward(self, region_features: torch.Tensor, teacher_features: torch.Tensor, box_mask: torch.Tensor) -> torch.Tensor:
        # region_features: [B, R, D]; teacher_features: [n_valid, D] in (b, r)
        # row-major order of the valid boxes; box_mask: [B, R]
        cosine = F.cosine_similarity(region_features[box_mask], teacher_features, dim=-1)
        total = all_reduce_sum(box_mask.sum().to(torch.float32), self.group)
        return (1.0 - cosine).sum() * world_size(self.group) / total.clamp_min(1.0)
