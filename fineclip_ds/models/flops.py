"""Analytic model FLOPs of one FineCLIP training step, counted the way torch's FlopCounterMode counts:
matmuls, convolutions and attention products (2 FLOPs per multiply-add), forward and backward;
norms, softmax, activations and RoIAlign are left out (a few percent at most).

Backward costs twice the forward for every GEMM whose input needs a gradient (grad input + grad
weight), once for the patch embedding (images need no gradient), nothing for a frozen text tower.
Recomputation by activation checkpointing is not model FLOPs and is not counted (as in MFU).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class TransformerShape:
    tokens: int
    width: int
    layers: int
    mlp_width: int


def block_flops(shape: TransformerShape) -> int:
    """One pre-norm block's forward: qkv, q.k, attn.v, out-proj, two MLP GEMMs."""
    t, w, m = shape.tokens, shape.width, shape.mlp_width
    return 2 * t * w * 3 * w + 2 * 2 * t * t * w + 2 * t * w * w + 2 * 2 * t * w * m


def value_only_block_flops(shape: TransformerShape) -> int:
    """The dense path's last block: value projection, out-projection, MLP; no q.k mixing."""
    t, w, m = shape.tokens, shape.width, shape.mlp_width
    return 2 * t * w * w + 2 * t * w * w + 2 * 2 * t * w * m


def _mlp_width(transformer: nn.Module) -> int:
    return transformer.resblocks[0].mlp.c_fc.out_features


@dataclass(frozen=True)
class FineCLIPShapes:
    image: TransformerShape
    patch_embed_flops: int  # per image
    text: TransformerShape
    embed_dim: int

    @classmethod
    def of(cls, clip: nn.Module) -> "FineCLIPShapes | None":
        """Shapes of an open_clip ViT pair; None for other towers (timm Eva), whose FLOPs are not modelled."""
        visual = clip.visual
        if not hasattr(visual, "conv1") or not hasattr(clip, "transformer"):
            return None
        grid = visual.grid_size
        patches = grid[0] * grid[1]
        conv = visual.conv1
        patch_embed = 2 * patches * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
        image = TransformerShape(patches + 1, visual.transformer.width, len(visual.transformer.resblocks),
                                 _mlp_width(visual.transformer))
        text = TransformerShape(clip.context_length, clip.transformer.width, len(clip.transformer.resblocks),
                                _mlp_width(clip.transformer))
        return cls(image, patch_embed, text, visual.output_dim)


def image_forward_flops(shapes: FineCLIPShapes) -> int:
    """encode_image: patch embedding, every block, projection of the class token."""
    return shapes.patch_embed_flops + shapes.image.layers * block_flops(shapes.image) + 2 * shapes.image.width * shapes.embed_dim


def dense_extra_forward_flops(shapes: FineCLIPShapes) -> int:
    """What the dense head adds to a trunk already computed: the value-only last block and a projection per patch."""
    patches = shapes.image.tokens - 1
    return value_only_block_flops(shapes.image) + 2 * patches * shapes.image.width * shapes.embed_dim


def text_forward_flops(shapes: FineCLIPShapes) -> int:
    return shapes.text.layers * block_flops(shapes.text) + 2 * shapes.text.width * shapes.embed_dim


def _train(forward: int, first_layer: int = 0) -> int:
    """Forward + backward of a trainable path whose input needs no gradient (its first layer: weight grad only)."""
    return 3 * forward - first_layer


def contrastive_flops(local_rows: int, global_rows: int, dim: int) -> int:
    """The chunked kernel (kernels.contrastive): each rank's row stripe of the logits once in forward
    (both directions from the same tiles), then recompute + two gradient GEMMs in backward."""
    return 4 * (2 * local_rows * global_rows * dim)


def step_flops(shapes: FineCLIPShapes, images: int, regions: int, region_slots: int, world_size: int,
               text_trainable: bool, sd_teacher_grad: bool, weights: dict[str, float]) -> int:
    """Model FLOPs of one micro-batch on one rank: `images` images with `regions` valid boxes
    (`region_slots` padded B x R rows, which the regional loss multiplies). Mirrors what
    FineCLIPObjective computes for the enabled losses."""
    use_regions = weights.get("sd", 0) > 0 or weights.get("rc", 0) > 0
    image_forward = image_forward_flops(shapes) + (dense_extra_forward_flops(shapes) if use_regions else 0)
    image = _train(image_forward, shapes.patch_embed_flops)
    texts = images + (regions if weights.get("rc", 0) > 0 else 0)
    text = text_forward_flops(shapes) * (3 if text_trainable else 1)
    total = images * image + texts * text
    if weights.get("sd", 0) > 0:
        crop_forward = image_forward_flops(shapes)
        total += regions * (_train(crop_forward, shapes.patch_embed_flops) if sd_teacher_grad else crop_forward)
    if weights.get("gc", 0) > 0:
        total += contrastive_flops(images, images * world_size, shapes.embed_dim)
    if weights.get("rc", 0) > 0:
        total += contrastive_flops(region_slots, region_slots * world_size, shapes.embed_dim)
    return total
