"""The FineCLIP training objective: one forward from a batch to the weighted sum of the three losses.

It is the module DeepSpeed wraps, so that every parameter use happens inside its forward.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from fineclip_ds.config import KernelConfig, LossConfig
from fineclip_ds.losses.global_contrastive import GlobalContrastiveLoss
from fineclip_ds.losses.regional_contrastive import RegionalContrastiveLoss
from fineclip_ds.losses.self_distillation import SelfDistillationLoss
from fineclip_ds.models.fineclip import FineCLIP
from fineclip_ds.models.regions import crop_regions


class FineCLIPObjective(nn.Module):
    def __init__(self, model: FineCLIP, losses: LossConfig, kernels: KernelConfig, group: dist.ProcessGroup | None = None):
        super().__init__()
        self.model = model
        self.weights = {"gc": losses.w_gc, "sd": losses.w_sd, "rc": losses.w_rc}
        self.sd_teacher_grad = losses.sd_teacher_grad
        self.crop_enlarge = losses.crop_enlarge
        self.region_pool_backend = kernels.region_pool
        self.global_contrastive = GlobalContrastiveLoss(group, kernels.contrastive)
        self.self_distillation = SelfDistillationLoss(group)
        self.regional_contrastive = RegionalContrastiveLoss(group, kernels.contrastive)

    def _encode_texts(self, texts: torch.Tensor, region_texts: torch.Tensor | None,
                      box_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Captions and valid region captions in one text-tower pass; [B, D] and [B, R, D] (0 where masked)."""
        tokens = texts if region_texts is None else torch.cat([texts, region_texts[box_mask]])
        text_frozen = not any(p.requires_grad for p in self.model.text_parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not text_frozen):
            embeddings = self.model.encode_text(tokens)
        batch = texts.shape[0]
        if region_texts is None:
            return embeddings, None
        region_embeddings = embeddings.new_zeros(*box_mask.shape, embeddings.shape[-1])
        region_embeddings[box_mask] = embeddings[batch:]
        return embeddings[:batch], region_embeddings

    def _encode_teacher(self, crops: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Global embeddings of the crops, [n_valid, D]. A rank whose batch has no valid box still runs
        the tower, on one stand-in image whose embedding is dropped: open_clip cannot encode an empty
        batch, and under ZeRO-3 every rank must run the same module forwards (each gathers its
        parameters collectively)."""
        if crops.shape[0] == 0:
            return self.model.encode_image(images[:1])[:0]
        return self.model.encode_image(crops)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns the weighted total and, detached for reporting, each loss term and the logit scale.

        Only what the enabled losses read is computed: no dense path without L_SD or L_RC, no region
        captions without L_RC (the L_GC-only baseline costs what CLIP costs)."""
        # batch: images [B,3,H,W], texts [B,L], boxes [B,R,4] xyxy pixels, box_mask [B,R], region_texts [B,R,L];
        # optional crop_images [B,3,s*H,s*W] (losses.crop_source_scale = s)
        images, boxes, box_mask = batch["images"], batch["boxes"], batch["box_mask"]
        use_regions = self.weights["sd"] > 0 or self.weights["rc"] > 0
        logit_scale = self.model.logit_scale()
        if use_regions:
            image_embeddings, dense, grid_hw = self.model.encode_image_and_dense(images)
            region_features = self.model.region_features(dense, grid_hw, boxes, box_mask,
                                                         self.region_pool_backend)
        else:
            image_embeddings = self.model.encode_image(images)
        region_texts = batch["region_texts"] if self.weights["rc"] > 0 else None
        text_embeddings, region_text_embeddings = self._encode_texts(batch["texts"], region_texts, box_mask)

        terms: dict[str, torch.Tensor] = {}
        if self.weights["gc"] > 0:
            terms["gc"] = self.global_contrastive(image_embeddings, text_embeddings, logit_scale)
        if self.weights["sd"] > 0:
            crop_images = batch.get("crop_images", images)  # the same image at a higher resolution, if given
            scale_x, scale_y = crop_images.shape[-1] / images.shape[-1], crop_images.shape[-2] / images.shape[-2]
            crop_boxes = boxes * boxes.new_tensor([scale_x, scale_y, scale_x, scale_y])
            crops = crop_regions(crop_images, crop_boxes, box_mask, self.crop_enlarge, tuple(images.shape[-2:]))
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.sd_teacher_grad):
                teacher = self._encode_teacher(crops, images)
            terms["sd"] = self.self_distillation(region_features, teacher, box_mask)
        if self.weights["rc"] > 0:
            terms["rc"] = self.regional_contrastive(region_features, region_text_embeddings, box_mask, logit_scale)
        total = sum(self.weights[name] * value for name, value in terms.items())
        report = {name: value.detach() for name, value in terms.items()}
        report["logit_scale"] = logit_scale.detach()
        return total, report
