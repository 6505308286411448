"""FineCLIP model: open_clip towers plus the dense-feature path that region features come from.

The image trunk (patch embedding and all blocks but the last) runs once per image; its output feeds
both heads:
  - global: the last block as trained, then the tower's pooling and projection (CLIP's image embedding);
  - dense: the last block with attention reduced to its value and output projections (no q.k
    mixing, as in CLIPSelf/FineCLIP), every patch token through the tower's final norm and
    projection, L2-normalised (open_clip ViTs: ln_post -> proj; timm EVA02 towers: norm -> head;
    `vision_towers` holds both).
In open_clip ViT towers and text towers, attention runs through `fineclip_ds.models.attention.Attention`
(flash-attn, SDPA or math), which keeps open_clip's parameter names and offers the value-only call;
timm's EVA02 towers keep their own attention (torch SDPA). Every submodule is still called through its
own forward, which ZeRO-3 needs to gather its parameters.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fineclip_ds.models.attention import use_attention_backend
from fineclip_ds.models.regions import pool_regions
from fineclip_ds.models.vision_towers import OpenClipViT, vision_tower_for

LOGIT_SCALE_MAX = math.log(100.0)


class CappedTemperature(torch.autograd.Function):
    """min(t, cap) whose gradient is blocked only where it would push t further above the cap.

    open_clip caps t by clamping the parameter after each optimizer step. Under DeepSpeed the step
    updates fp32 master copies that an in-place clamp of the module's parameter does not reach, so
    the cap lives here instead. A plain clamp would be wrong: its gradient is zero at and above the
    cap, and every pretrained CLIP stores fp32(ln 100) > ln 100, so the temperature could never be
    learned again. Here t above the cap still moves down when the loss wants a smaller scale.
    """

    @staticmethod
    def forward(ctx, log_scale: torch.Tensor, cap: float) -> torch.Tensor:
        ctx.save_for_backward(log_scale)
        ctx.cap = cap
        return log_scale.clamp(max=cap)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (log_scale,) = ctx.saved_tensors
        raises_past_cap = (log_scale >= ctx.cap) & (grad < 0)  # descent moves t by -grad
        return grad.masked_fill(raises_past_cap, 0.0), None


def text_tower_of(clip: nn.Module) -> nn.Module:
    """The module holding the text transformer: CLIP itself, or `.text` of a CustomTextCLIP (EVA02)."""
    return getattr(clip, "text", clip)


class FineCLIP(nn.Module):
    """An open_clip CLIP model with FineCLIP's region path.

    Images go in at the model's input size (`image_size`), normalised with the mean and std that
    `create_fineclip` returns; every embedding comes out L2-normalised. A box over the whole image pools
    the dense map, which is not the global embedding: `encode_image` is the one for whole images."""

    def __init__(
        self, clip: nn.Module, freeze_text: bool = True, grad_checkpointing: bool = False, checkpoint_every: int = 1,
        attention: str = "auto",
    ):
        super().__init__()
        if tuple(clip.logit_scale.shape) != (1,):
            raise ValueError("the CLIP model must be built with nonscalar_logit_scale=True (DeepSpeed needs shape [1])")
        self.tower = vision_tower_for(clip.visual)
        if isinstance(self.tower, OpenClipViT):  # timm's Eva already runs torch SDPA
            use_attention_backend(clip.visual.transformer, attention)
        text = text_tower_of(clip)
        if hasattr(text, "transformer") and hasattr(text.transformer, "resblocks"):
            use_attention_backend(text.transformer, attention)
        self.clip = clip
        self.grad_checkpointing = grad_checkpointing
        self.checkpoint_every = checkpoint_every
        self.freeze_text = freeze_text
        if freeze_text:
            for param in self.text_parameters():
                param.requires_grad_(False)
            self.train(self.training)

    # --- structure -------------------------------------------------------------------------
    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def image_size(self) -> tuple[int, int]:
        return self.tower.image_size

    @property
    def patch_size(self) -> tuple[int, int]:
        return self.tower.patch_size

    def text_modules(self) -> list[nn.Module]:
        """The modules of the text tower: `.text` of a CustomTextCLIP, or every child of CLIP but the visual."""
        return [child for child in self.clip.children() if child is not self.visual]

    def train(self, mode: bool = True) -> "FineCLIP":
        """A frozen text tower stays in eval mode, as FineCLIP's code keeps it (its CustomCLIP.train): with
        dropout (HF text towers have it) the frozen caption and region-caption embeddings would be noisy."""
        super().train(mode)
        if self.freeze_text:
            for module in self.text_modules():
                module.train(False)
        return self

    def text_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the text tower (all of CLIP but the visual tower and the logit scale)."""
        visual_ids = {id(p) for p in self.visual.parameters()}
        return [p for n, p in self.clip.named_parameters() if id(p) not in visual_ids and n != "logit_scale"]

    def parameters_read_outside_owner_forward(self) -> list[nn.Parameter]:
        """Parameters read by methods rather than by their owner's forward (class/positional embeddings,
        projections, logit scale); ZeRO-3 must be told to gather them for the whole forward of the
        module that wraps this one."""
        return list(self.clip.parameters(recurse=False)) + self.tower.parameters_read_outside_owner_forward()

    def logit_scale(self) -> torch.Tensor:
        """The contrastive temperature multiplier exp(t), t capped at ln(100) as in CLIP ([1])."""
        return CappedTemperature.apply(self.clip.logit_scale, LOGIT_SCALE_MAX).exp()

    # --- towers ----------------------------------------------------------------------------
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text embeddings of tokenised captions (the tokenizer `create_fineclip` returns)."""
        # tokens: [N, L] -> [N, D] L2-normalised
        return F.normalize(self.clip.encode_text(tokens), dim=-1)

    def _recompute(self, block_index: int) -> bool:
        return self.grad_checkpointing and self.training and block_index % self.checkpoint_every == 0

    def _run(self, block_fn, block: nn.Module, x: torch.Tensor, context, block_index: int) -> torch.Tensor:
        if self._recompute(block_index):
            return checkpoint(block_fn, block, x, context, use_reentrant=False)
        return block_fn(block, x, context)

    def _check_images(self, images: torch.Tensor) -> None:
        """A wrong input is named with the size the model takes and how to make it, instead of a shape or dtype
        error from inside the tower ('The size of tensor a (1001) must match the size of tensor b (65)')."""
        height, width = self.image_size
        if (images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point()
                or tuple(images.shape[-2:]) != (height, width)):
            raise ValueError(f"images: got shape {tuple(images.shape)} of {images.dtype}, expected [B, 3, {height}, "
                             f"{width}] normalised floats, the model's input size (data.transforms.RegionTransform("
                             "model.image_size, mean, std) makes them; for another size build or load the model at it)")

    def _trunk(self, images: torch.Tensor) -> tuple[torch.Tensor, object]:
        # images: [B, 3, H, W] -> (tokens before the last block [B, prefix + h*w, width], tower context)
        self._check_images(images)
        x, context = self.tower.embed(images)
        for index, block in enumerate(self.tower.blocks[:-1]):
            x = self._run(self.tower.run_block, block, x, context, index)
        return x, context

    def _last_block(self, x: torch.Tensor, context, value_only: bool) -> torch.Tensor:
        block_fn = self.tower.value_only_block if value_only else self.tower.run_block
        return self._run(block_fn, self.tower.blocks[-1], x, context, len(self.tower.blocks) - 1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's global image embedding (what plain open_clip gives for the exported weights)."""
        # images: [B, 3, H, W] -> [B, D] L2-normalised global embedding
        x, context = self._trunk(images)
        return F.normalize(self.tower.global_head(self._last_block(x, context, value_only=False)), dim=-1)

    def encode_image_and_dense(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Global embedding and dense token map from one trunk pass.

        Returns ([B, D], [B, h*w, D] row-major over the (h, w) patch grid, (h, w)); both normalised."""
        x, context = self._trunk(images)
        global_embedding = self.tower.global_head(self._last_block(x, context, value_only=False))
        return F.normalize(global_embedding, dim=-1), self._dense(x, context), self._grid_hw(images)

    def encode_dense(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The dense token map alone (evaluation): the last block runs once, value-only, without the global head."""
        # images: [B, 3, H, W] -> ([B, h*w, D] normalised, row-major over (h, w), (h, w))
        x, context = self._trunk(images)
        return self._dense(x, context), self._grid_hw(images)

    def _dense(self, x: torch.Tensor, context) -> torch.Tensor:
        return F.normalize(self.tower.dense_head(self._last_block(x, context, value_only=True)), dim=-1)

    def _grid_hw(self, images: torch.Tensor) -> tuple[int, int]:
        return images.shape[-2] // self.patch_size[0], images.shape[-1] // self.patch_size[1]

    def region_features(
        self,
        dense: torch.Tensor,
        grid_hw: tuple[int, int],
        boxes: torch.Tensor,
        box_mask: torch.Tensor | None = None,
        backend: str = "auto",
    ) -> torch.Tensor:
        """Region features: each box RoIAligned (1x1) on the dense map, then L2-normalised.

        `boxes` are x1, y1, x2, y2 in pixels of the model input (`data.transforms.RegionTransform` maps an
        image's boxes there); `box_mask` True marks a real box. Masked boxes, and boxes more than a patch
        outside the map (RoIAlign moves samples up to one cell outside onto its edge), give zero rows."""
        # dense: [B, h*w, D]; boxes: [B, R, 4] xyxy input pixels -> [B, R, D] normalised (masked rows 0)
        patch_h, patch_w = self.patch_size
        if patch_w != patch_h:
            # region pooling takes one scale: each axis goes to grid units here, in fp64 and by one division, so that a
            # patch-aligned box is a whole number of cells (x * (patch_h / patch_w) in fp32, then * (1 / patch_h), put
            # 14 * k px above k cells for 16 x 14 patches: one adaptive sample more, blending the next patches)
            patches = torch.tensor([patch_w, patch_h, patch_w, patch_h], dtype=torch.float64, device=boxes.device)
            return pool_regions(dense, boxes.double() / patches, grid_hw, 1.0, box_mask, backend=backend)
        return pool_regions(dense, boxes, grid_hw, 1.0 / patch_h, box_mask, backend=backend)
