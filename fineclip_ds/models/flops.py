"""Analytic model FLOPs of one FineCLIP training step, counted the way torch's FlopCounterMode counts:
matmuls, convolutions and attention products (2 FLOPs per multiply-add), forward and backward;
norms, softmax, activations, rotary embeddings and RoIAlign are left out (a few percent at most).

Backward costs twice the forward for every GEMM whose input needs a gradient (grad input + grad
weight), once for the patch embedding (images need no gradient), nothing for a frozen text tower,
nothing for what no enabled loss reads (its forward still runs; see `step_flops`).
Recomputation by activation checkpointing is not model FLOPs and is not counted (as in MFU); the
contrastive kernel's backward recomputation of its logits tiles is (its algorithm, not an option,
and under 0.1% of a step).

Towers: open_clip's VisionTransformer and timm's Eva (EVA02-CLIP: SwiGLU/GLU MLP, fused or separate
q/k/v) for images, open_clip's text transformer for texts; `FineCLIPShapes.of` gives None otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fineclip_ds.models.fineclip import text_tower_of


@dataclass(frozen=True)
class TransformerShape:
    tokens: int
    width: int
    layers: int
    mlp_width: int
    mlp_matrices: int = 2  # width x mlp_width weights in the MLP: fc and proj, or gate, value and proj ((Swi)GLU)
    value_only_qkv: int = 1  # width x width projections the value-only block computes: v, or q, k and v
    #                          where one fused qkv GEMM is run and split (timm Eva)


def block_flops(shape: TransformerShape) -> int:
    """One pre-norm block's forward: qkv, q.k, attn.v, out-proj, the MLP GEMMs."""
    t, w, m = shape.tokens, shape.width, shape.mlp_width
    return 2 * t * w * 3 * w + 2 * 2 * t * t * w + 2 * t * w * w + 2 * shape.mlp_matrices * t * w * m


def value_only_block_flops(shape: TransformerShape) -> int:
    """The dense path's last block: value projection, out-projection, MLP; no q.k mixing."""
    t, w, m = shape.tokens, shape.width, shape.mlp_width
    return 2 * t * w * w * shape.value_only_qkv + 2 * t * w * w + 2 * shape.mlp_matrices * t * w * m


def _mlp_width(transformer: nn.Module) -> int:
    return transformer.resblocks[0].mlp.c_fc.out_features


def _linear_macs(module: nn.Module) -> int:
    """Multiply-adds per token of the Linear layers in `module`, run one after another."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _eva_block_shape(block: nn.Module, tokens: int, width: int, layers: int) -> TransformerShape | None:
    attention, mlp = block.attn, block.mlp
    if getattr(attention, "gate", None) is not None or attention.num_heads * attention.head_dim != width:
        return None
    mlp_width = mlp.fc2.in_features
    matrices, remainder = divmod(_linear_macs(mlp), width * mlp_width)
    if remainder:
        return None
    return TransformerShape(tokens, width, layers, mlp_width, matrices, 3 if attention.qkv is not None else 1)


@dataclass(frozen=True)
class FineCLIPShapes:
    image: TransformerShape
    patch_embed_flops: int  # per image
    text: TransformerShape
    embed_dim: int
    image_head_flops: int  # per token projected (class token; every patch on the dense path)
    patches: int  # image tokens that are patches (the others are class/register tokens)

    @classmethod
    def of(cls, clip: nn.Module) -> "FineCLIPShapes | None":
        """Shapes of an open_clip ViT or timm Eva image tower with an open_clip text transformer; None otherwise."""
        visual = clip.visual
        text_tower = text_tower_of(clip)
        if not hasattr(text_tower, "transformer") or not hasattr(text_tower.transformer, "resblocks"):
            return None
        if hasattr(visual, "conv1") and hasattr(visual, "transformer"):  # open_clip VisionTransformer
            grid = visual.grid_size
            patches = grid[0] * grid[1]
            conv = visual.conv1
            image = TransformerShape(patches + 1, visual.transformer.width, len(visual.transformer.resblocks),
                                     _mlp_width(visual.transformer))
            embed_dim = visual.output_dim
            head = 2 * visual.transformer.width * embed_dim
        elif type(getattr(visual, "trunk", None)).__name__ == "Eva":  # timm Eva in open_clip's TimmModel
            trunk = visual.trunk
            grid = trunk.patch_embed.grid_size
            patches = grid[0] * grid[1]
            conv = trunk.patch_embed.proj
            image = _eva_block_shape(trunk.blocks[0], patches + trunk.num_prefix_tokens, trunk.embed_dim,
                                     len(trunk.blocks))
            if image is None:
                return None
            head = 2 * (_linear_macs(trunk.head) + _linear_macs(visual.head))
            projection = text_tower.text_projection  # [width, D] parameter or Linear; the towers meet in D
            # ZeRO-3 leaves a partitioned parameter empty; ds_shape is its full shape
            embed_dim = (projection.out_features if isinstance(projection, nn.Linear)
                         else getattr(projection, "ds_shape", projection.shape)[1])
        else:
            return None
        patch_embed = 2 * patches * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
        text = TransformerShape(text_tower.context_length, text_tower.transformer.width,
                                len(text_tower.transformer.resblocks), _mlp_width(text_tower.transformer))
        return cls(image, patch_embed, text, embed_dim, head, patches)


def image_forward_flops(shapes: FineCLIPShapes) -> int:
    """encode_image: patch embedding, every block, projection of the class token."""
    return shapes.patch_embed_flops + shapes.image.layers * block_flops(shapes.image) + shapes.image_head_flops


def global_head_forward_flops(shapes: FineCLIPShapes) -> int:
    """What encode_image runs after the trunk: the last block as trained and the class token's projection."""
    return block_flops(shapes.image) + shapes.image_head_flops


def dense_extra_forward_flops(shapes: FineCLIPShapes) -> int:
    """What the dense head adds to a trunk already computed: the value-only last block and a projection per patch."""
    return value_only_block_flops(shapes.image) + shapes.patches * shapes.image_head_flops


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
    FineCLIPObjective computes for the enabled losses: crops only for valid boxes and only with L_SD,
    region captions only for valid boxes and only with L_RC. It computes the global embedding and the
    captions' embeddings whatever the weights; without L_GC nothing reads them (the dense path's
    global head; the captions, unless a trainable text tower also encodes region captions in the same
    batch), so their backward is not run and not counted."""
    gc, sd, rc = (weights.get(name, 0) > 0 for name in ("gc", "sd", "rc"))
    if sd or rc:
        image_forward = image_forward_flops(shapes) + dense_extra_forward_flops(shapes)
        unread = 0 if gc else global_head_forward_flops(shapes)
        image = _train(image_forward - unread, shapes.patch_embed_flops) + unread
    else:
        image = _train(image_forward_flops(shapes), shapes.patch_embed_flops)
    texts = images + (regions if rc else 0)
    text = text_forward_flops(shapes) * (3 if text_trainable and (gc or rc) else 1)
    total = images * image + texts * text
    if sd:
        crop_forward = image_forward_flops(shapes)
        total += regions * (_train(crop_forward, shapes.patch_embed_flops) if sd_teacher_grad else crop_forward)
    if gc:
        total += contrastive_flops(images, images * world_size, shapes.embed_dim)
    if rc:
        total += contrastive_flops(region_slots, region_slots * world_size, shapes.embed_dim)
    return total
