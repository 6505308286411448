"""FineCLIP model: open_clip towers plus the dense-feature path that region features come from.

The image trunk (patch embedding and all blocks but the last) runs once per image; its output feeds
both heads:
  - global: the last block as trained, class token -> ln_post -> proj (CLIP's image embedding);
  - dense: the last block with attention reduced to its value and output projections (no q.k
    mixing, as in CLIPSelf/FineCLIP), every patch token -> ln_post -> proj, L2-normalised.
Attention runs through `fineclip_ds.models.attention.Attention` (flash-attn, SDPA or math), which
keeps open_clip's parameter names and offers the value-only call; every submodule is still called
through its own forward, which ZeRO-3 needs to gather its parameters.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fineclip_ds.models.attention import use_attention_backend
from fineclip_ds.models.regions import pool_regions

LOGIT_SCALE_MAX = math.log(100.0)


class FineCLIP(nn.Module):
    def __init__(
        self, clip: nn.Module, freeze_text: bool = True, grad_checkpointing: bool = False, checkpoint_every: int = 1,
        attention: str = "auto",
    ):
        super().__init__()
        visual = clip.visual
        if getattr(visual, "attn_pool", None) is not None or not hasattr(visual, "transformer"):
            raise ValueError(
                f"model.name: {type(visual).__name__} is not supported; the dense path needs an open_clip "
                "VisionTransformer without attentional pooling"
            )
        if tuple(clip.logit_scale.shape) != (1,):
            raise ValueError("the CLIP model must be built with nonscalar_logit_scale=True (DeepSpeed needs shape [1])")
        use_attention_backend(visual.transformer, attention)
        use_attention_backend(clip.transformer, attention)
        self.clip = clip
        self.grad_checkpointing = grad_checkpointing
        self.checkpoint_every = checkpoint_every
        if freeze_text:
            for param in self.text_parameters():
                param.requires_grad_(False)

    # --- structure -------------------------------------------------------------------------
    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.visual.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def patch_size(self) -> tuple[int, int]:
        size = self.visual.patch_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def text_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the text tower (all of CLIP but the visual tower and the logit scale)."""
        visual_ids = {id(p) for p in self.visual.parameters()}
        return [p for n, p in self.clip.named_parameters() if id(p) not in visual_ids and n != "logit_scale"]

    def parameters_read_outside_owner_forward(self) -> list[nn.Parameter]:
        """Direct parameters of CLIP and its visual tower, read by methods rather than by their owner's
        forward (class/positional embeddings, projections, logit scale); ZeRO-3 must be told to gather
        them for the whole forward of the module that wraps this one."""
        return list(self.clip.parameters(recurse=False)) + list(self.visual.parameters(recurse=False))

    def logit_scale(self) -> torch.Tensor:
        """The contrastive temperature multiplier exp(t), t clamped to ln(100) as in CLIP ([1])."""
        return self.clip.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()

    # --- towers ----------------------------------------------------------------------------
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: [N, L] -> [N, D] L2-normalised
        return F.normalize(self.clip.encode_text(tokens), dim=-1)

    def _recompute(self, block_index: int) -> bool:
        return self.grad_checkpointing and self.training and block_index % self.checkpoint_every == 0

    def _run_block(self, block: nn.Module, x: torch.Tensor, block_index: int) -> torch.Tensor:
        if self._recompute(block_index):
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def _trunk(self, images: torch.Tensor) -> torch.Tensor:
        # images: [B, 3, H, W] -> tokens before the last block, [B, 1 + h*w, width] batch-first
        x = self.visual._embeds(images)
        for index, block in enumerate(self.visual.transformer.resblocks[:-1]):
            x = self._run_block(block, x, index)
        return x

    @staticmethod
    def _value_only_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The last block with attention reduced to out_proj(v): no token mixing."""
        x = x + block.ls_1(block.attn(block.ln_1(x), value_only=True)[0])
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def _last_block(self, x: torch.Tensor, value_only: bool) -> torch.Tensor:
        block = self.visual.transformer.resblocks[-1]
        last_index = len(self.visual.transformer.resblocks) - 1
        if not value_only:
            return self._run_block(block, x, last_index)
        if self._recompute(last_index):
            return checkpoint(self._value_only_block, block, x, use_reentrant=False)
        return self._value_only_block(block, x)

    def _global_head(self, trunk: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.visual._pool(self._last_block(trunk, value_only=False))
        return F.normalize(pooled @ self.visual.proj, dim=-1)

    def _dense_head(self, trunk: torch.Tensor) -> torch.Tensor:
        tokens = self._last_block(trunk, value_only=True)[:, 1:]
        return F.normalize(self.visual.ln_post(tokens) @ self.visual.proj, dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        # images: [B, 3, H, W] -> [B, D] L2-normalised global embedding
        return self._global_head(self._trunk(images))

    def encode_image_and_dense(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Global embedding and dense token map from one trunk pass.

        Returns ([B, D], [B, h*w, D] row-major over the (h, w) patch grid, (h, w)); both normalised."""
        trunk = self._trunk(images)
        grid_hw = (images.shape[-2] // self.patch_size[0], images.shape[-1] // self.patch_size[1])
        return self._global_head(trunk), self._dense_head(trunk), grid_hw

    def encode_dense(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        _, dense, grid_hw = self.encode_image_and_dense(images)
        return dense, grid_hw

    def region_features(
        self,
        dense: torch.Tensor,
        grid_hw: tuple[int, int],
        boxes: torch.Tensor,
        box_mask: torch.Tensor | None = None,
        backend: str = "auto",
    ) -> torch.Tensor:
        # dense: [B, h*w, D]; boxes: [B, R, 4] xyxy input pixels -> [B, R, D] normalised (masked rows 0)
        spatial_scale = 1.0 / self.patch_size[0]
        return pool_regions(dense, boxes, grid_hw, spatial_scale, box_mask, backend=backend)
