"""The image towers FineCLIP can train, behind one interface: embed, blocks, value-only last block, heads.

FineCLIP's dense path needs to step through the tower block by block and to run the last block with
attention reduced to its value path. open_clip builds two kinds of ViT: its own VisionTransformer
(OpenAI/LAION CLIP) and timm's Eva inside a TimmModel (EVA02-CLIP). Each adapter reaches into one of
them; nothing else in the model does.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fineclip_ds.sizes import height_width


# Patch dropout in training leaves a dense map short of the patch grid: region pooling failed on its shape, naming
# no setting
DROPS_PATCHES = ("model.name: its model config sets vision_cfg patch_dropout > 0, which drops patch tokens in training; "
                 "FineCLIP's region features need every patch: set it to 0")


class OpenClipViT:
    """open_clip.transformer.VisionTransformer (class token, ln_post, proj matrix)."""

    def __init__(self, visual: nn.Module):
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError("model.name: attentional-pooling ViTs (CoCa) are not supported by the dense path")
        if not isinstance(getattr(visual, "patch_dropout", nn.Identity()), nn.Identity):
            raise ValueError(DROPS_PATCHES)
        self.visual = visual
        self.blocks = visual.transformer.resblocks

    @property
    def patch_size(self) -> tuple[int, int]:
        return height_width(self.visual.patch_size)

    @property
    def image_size(self) -> tuple[int, int]:
        return height_width(self.visual.image_size)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return self.visual._embeds(images), None

    def run_block(self, block: nn.Module, x: torch.Tensor, context: Any) -> torch.Tensor:
        return block(x)

    def value_only_block(self, block: nn.Module, x: torch.Tensor, context: Any) -> torch.Tensor:
        """The block with attention reduced to out_proj(v): no token mixing."""
        x = x + block.ls_1(block.attn(block.ln_1(x), value_only=True)[0])
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def global_head(self, x: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.visual._pool(x)
        return pooled @ self.visual.proj

    def dense_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual.ln_post(x[:, 1:]) @ self.visual.proj

    def parameters_read_outside_owner_forward(self) -> list[nn.Parameter]:
        return list(self.visual.parameters(recurse=False))


class TimmEva:
    """open_clip's TimmModel around timm's Eva (EVA02-CLIP): rotary embeddings, sub-LN attention, a head."""

    def __init__(self, visual: nn.Module):
        self.visual = visual
        self.trunk = visual.trunk
        if self.trunk.global_pool != "token" or getattr(self.trunk, "rope_mixed", False):
            raise ValueError("model.name: only class-token Eva towers without mixed RoPE are supported")
        if getattr(self.trunk, "patch_drop", None) is not None:
            raise ValueError(DROPS_PATCHES)
        self.blocks = self.trunk.blocks

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.trunk.patch_embed.patch_size)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.trunk.patch_embed.img_size)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, Any]:
        x, rope = self.trunk._pos_embed(self.trunk.patch_embed(images))
        return self.trunk.norm_pre(x), rope

    def run_block(self, block: nn.Module, x: torch.Tensor, context: Any) -> torch.Tensor:
        return block(x, rope=context)

    def value_only_block(self, block: nn.Module, x: torch.Tensor, context: Any) -> torch.Tensor:
        """EvaBlock with attention reduced to proj(gate * norm(v)): each token attends only to itself."""
        attention = block.attn
        normed = block.norm1(x)
        if attention.qkv is not None:
            bias = (None if attention.q_bias is None
                    else torch.cat((attention.q_bias, attention.k_bias, attention.v_bias)))
            value = F.linear(normed, attention.qkv.weight, bias if bias is not None else attention.qkv.bias)
            value = value.chunk(3, dim=-1)[2]
        else:
            value = attention.v_proj(normed)
        value = attention.norm(value)
        if attention.gate is not None:
            value = value * attention.gate(normed).sigmoid()
        x_attn = attention.proj(value)
        x = x + (block.gamma_1 * x_attn if block.gamma_1 is not None else x_attn)
        x_mlp = block.mlp(block.norm2(x))
        return x + (block.gamma_2 * x_mlp if block.gamma_2 is not None else x_mlp)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual.head(self.trunk.head(self.trunk.fc_norm(x)))

    def global_head(self, x: torch.Tensor) -> torch.Tensor:
        return self._project(self.trunk.norm(x)[:, 0])

    def dense_head(self, x: torch.Tensor) -> torch.Tensor:
        return self._project(self.trunk.norm(x[:, self.trunk.num_prefix_tokens:]))

    def parameters_read_outside_owner_forward(self) -> list[nn.Parameter]:
        """Besides the direct parameters, the last attention's projections and the last block's own
        (layer-scale gamma_1/gamma_2 where the config has them): the value-only path reads them
        outside their owners' forwards."""
        last_attention = self.blocks[-1].attn
        return (list(self.visual.parameters(recurse=False)) + list(self.trunk.parameters(recurse=False))
                + list(self.blocks[-1].parameters(recurse=False)) + list(last_attention.parameters(recurse=False))
                + (list(last_attention.qkv.parameters()) if last_attention.qkv is not None else []))


def vision_tower_for(visual: nn.Module) -> OpenClipViT | TimmEva:
    if hasattr(visual, "transformer") and hasattr(visual, "_embeds"):
        return OpenClipViT(visual)
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and type(trunk).__name__ == "Eva":
        return TimmEva(visual)
    raise ValueError(f"model.name: a {type(visual).__name__} image tower is not supported; FineCLIP's dense path "
                     "needs an open_clip VisionTransformer or a timm Eva (EVA02-CLIP)")
