"""Self-attention for open_clip's ViT blocks with a choice of kernel, keeping open_clip's weight names.

`Attention` replaces `nn.MultiheadAttention` inside `ResidualAttentionBlock` (same call signature
and the same parameters: `in_proj_weight`, `in_proj_bias`, `out_proj.weight`, `out_proj.bias`), so
checkpoints stay interchangeable with open_clip. Backends:
  - "flash_attn": the flash-attn package's packed-QKV kernel (CUDA, fp16/bf16, no mask);
  - "sdpa": torch's scaled_dot_product_attention (its flash / memory-efficient kernels on GPU);
  - "math": softmax(q k^T / sqrt(d)) v written out, the numerical reference;
  - "auto": flash_attn when installed and usable, else sdpa.
A call that flash_attn cannot serve (a mask, fp32, CPU) falls back to sdpa.
`value_only=True` returns out_proj(v): the dense-feature path of CLIPSelf/FineCLIP.
"""
from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F
from torch import nn

from fineclip_ds.config import ATTENTION_BACKENDS

FLASH_ATTN_INSTALLED = importlib.util.find_spec("flash_attn") is not None


def _flash_attn_usable(x: torch.Tensor, attn_mask: torch.Tensor | None) -> bool:
    return FLASH_ATTN_INSTALLED and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and attn_mask is None


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, backend: str = "auto"):
        super().__init__()
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"model.attention: got {backend!r}, expected one of {ATTENTION_BACKENDS}")
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.backend = backend
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    @classmethod
    def replacing(cls, attention: nn.MultiheadAttention, backend: str) -> "Attention":
        """Take over an open_clip block's nn.MultiheadAttention, sharing its parameter tensors."""
        if not attention.batch_first or attention.in_proj_weight is None or attention.in_proj_bias is None:
            raise ValueError("only batch-first nn.MultiheadAttention with packed, biased projections can be replaced")
        module = cls(attention.embed_dim, attention.num_heads, backend)
        module.in_proj_weight = attention.in_proj_weight
        module.in_proj_bias = attention.in_proj_bias
        module.out_proj = attention.out_proj
        return module

    def forward(
        self,
        q_x: torch.Tensor,
        k_x: torch.Tensor | None = None,
        v_x: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        value_only: bool = False,
    ) -> tuple[torch.Tensor, None]:
        # q_x: [B, N, C] (self-attention: k_x and v_x must be None or q_x itself) -> ([B, N, C], None)
        if not (_same_tensor(k_x, q_x) and _same_tensor(v_x, q_x)) or need_weights:
            raise NotImplementedError("Attention serves self-attention without returned weights only")
        batch, tokens, width = q_x.shape
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask  # nn.MultiheadAttention's True = not attended; SDPA's and ours: True = attend
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = _per_batch_and_head(attn_mask, batch, self.heads)
        if value_only:
            value = F.linear(q_x, self.in_proj_weight[2 * width:], self.in_proj_bias[2 * width:])
            return self.out_proj(value), None
        qkv = F.linear(q_x, self.in_proj_weight, self.in_proj_bias).view(batch, tokens, 3, self.heads, width // self.heads)
        backend = self.backend
        if backend in ("auto", "flash_attn"):
            backend = "flash_attn" if _flash_attn_usable(q_x, attn_mask) else "sdpa"
        if backend == "flash_attn":
            from flash_attn import flash_attn_qkvpacked_func

            out = flash_attn_qkvpacked_func(qkv)  # [B, N, H, Dh]
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, N, Dh]
            mask = attn_mask.to(q.dtype) if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
            out = (F.scaled_dot_product_attention(q, k, v, attn_mask=mask) if backend == "sdpa"
                   else math_attention(q, k, v, mask)).transpose(1, 2)
        return self.out_proj(out.reshape(batch, tokens, width)), None


def _same_tensor(other: torch.Tensor | None, q_x: torch.Tensor) -> bool:
    """open_clip passes q_x as k_x and v_x; ZeRO-3's module hooks may hand them over as distinct
    tensor objects that alias the same memory, so compare storage, not identity."""
    return other is None or other is q_x or (other.shape == q_x.shape and other.data_ptr() == q_x.data_ptr())


def _per_batch_and_head(attn_mask: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """nn.MultiheadAttention's 3-D mask, [B * H, N, N] batch-major (open_clip's key-padding and class-token text
    masks), as the [B, H, N, N] that SDPA and math_attention broadcast against [B, H, N, Dh] queries."""
    return attn_mask.view(batch, heads, *attn_mask.shape[-2:])


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    # q, k, v: [B, H, N, Dh]; attn_mask: additive float or boolean (True = attend), [N, N] or [B, H, N, N]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores.softmax(dim=-1) @ v


def use_attention_backend(tower: nn.Module, backend: str) -> None:
    """Swap every nn.MultiheadAttention in an open_clip transformer for `Attention` (in place)."""
    for block in tower.resblocks:
        if not isinstance(block.attn, nn.MultiheadAttention):
            raise ValueError(f"{type(block).__name__} blocks are not supported; expected open_clip ResidualAttentionBlock")
        block.attn = Attention.replacing(block.attn, backend)
