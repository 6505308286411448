"""The analytic FLOPs of a whole FineCLIP step against torch's FlopCounterMode (within 5%)."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fineclip_ds.config import KernelConfig, LossConfig, ModelConfig
from fineclip_ds.losses.objective import FineCLIPObjective
from fineclip_ds.models.factory import create_fineclip
from fineclip_ds.models import flops
from fineclip_ds.models.flops import FineCLIPShapes, step_flops


def _batch(tokenizer, images: int, slots: int, valid: list[int], size: tuple[int, int] = (64, 64),
           crop_source_scale: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    boxes = torch.tensor([4.0, 6.0, 40.0, 50.0]).repeat(images, slots, 1)
    box_mask = torch.zeros(images, slots, dtype=torch.bool)
    for row, count in enumerate(valid):
        box_mask[row, :count] = True
    batch = {
        "images": torch.randn(images, 3, *size, generator=generator),
        "texts": tokenizer(["a photo"] * images),
        "boxes": boxes,
        "box_mask": box_mask,
        "region_texts": tokenizer(["a region"] * images * slots).view(images, slots, -1),
    }
    if crop_source_scale > 1:
        batch["crop_images"] = torch.randn(images, 3, *(crop_source_scale * s for s in size), generator=generator)
    return batch


def _count(fn) -> int:
    """FLOPs of fn() as FlopCounterMode sees them. On a CPU torch's SDPA runs a fused kernel that the
    counter does not know (timm's Eva calls it); its math backend's matmuls are counted."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("freeze_text,sd_teacher_grad,weights", [
    (False, True, {"w_gc": 1.0, "w_sd": 1.0, "w_rc": 1.0}),
    (True, True, {"w_gc": 1.0, "w_sd": 1.0, "w_rc": 1.0}),
    (True, False, {"w_gc": 1.0, "w_sd": 1.0, "w_rc": 0.0}),
    (True, True, {"w_gc": 1.0, "w_sd": 0.0, "w_rc": 0.0}),
    # without L_GC the global head and the captions are computed but read by no loss: forward only
    (True, True, {"w_gc": 0.0, "w_sd": 1.0, "w_rc": 1.0}),
    (True, True, {"w_gc": 0.0, "w_sd": 0.0, "w_rc": 1.0}),
    (False, True, {"w_gc": 0.0, "w_sd": 1.0, "w_rc": 0.0}),
    (False, True, {"w_gc": 0.0, "w_sd": 1.0, "w_rc": 1.0}),  # captions batched with region captions: backward
])
def test_analytic_step_flops_match_the_flop_counter(freeze_text, sd_teacher_grad, weights):
    torch.manual_seed(0)
    model, tokenizer, _ = create_fineclip(ModelConfig(freeze_text=freeze_text, attention="math"))
    losses = LossConfig(sd_teacher_grad=sd_teacher_grad, **weights)
    objective = FineCLIPObjective(model, losses, KernelConfig(region_pool="torch", contrastive="torch"))
    valid = [3, 1, 2]
    batch = _batch(tokenizer, images=3, slots=3, valid=valid)
    with FlopCounterMode(display=False) as counter:
        total, _ = objective(batch)
        total.backward()
    measured = counter.get_total_flops()
    analytic = step_flops(FineCLIPShapes.of(model.clip), images=3, regions=sum(valid), region_slots=9, world_size=1,
                          text_trainable=not freeze_text, sd_teacher_grad=sd_teacher_grad,
                          weights={"gc": losses.w_gc, "sd": losses.w_sd, "rc": losses.w_rc})
    # the issue asks for 5%; GEMM-for-GEMM the count is exact, so hold it to 1%
    assert analytic == pytest.approx(measured, rel=0.01), (analytic, measured)


def test_eva_step_flops_match_the_flop_counter():
    """The shipped EVA02 tower (timm Eva: fused qkv split on the value-only path, GLU MLP, RoPE) at a
    non-square size, teacher crops from a 2x source, a padded box slot and an image without boxes."""
    torch.manual_seed(0)
    model, tokenizer, _ = create_fineclip(ModelConfig(name="FineCLIP-EVA02-T-14", image_size=[56, 84]))
    losses = LossConfig(crop_source_scale=2)
    objective = FineCLIPObjective(model, losses, KernelConfig(region_pool="torch", contrastive="torch"))
    valid = [2, 0, 1]
    batch = _batch(tokenizer, images=3, slots=3, valid=valid, size=(56, 84), crop_source_scale=2)

    def step():
        total, _ = objective(batch)
        total.backward()

    measured = _count(step)
    analytic = step_flops(FineCLIPShapes.of(model.clip), images=3, regions=sum(valid), region_slots=9, world_size=1,
                          text_trainable=False, sd_teacher_grad=True, weights=objective.weights)
    assert analytic == pytest.approx(measured, rel=0.01), (analytic, measured)


@pytest.mark.parametrize("name", ["EVA02-L-14", "ViT-bigG-14"])
def test_large_tower_counts_match_on_the_meta_device(name):
    """Full-size towers, counted on meta tensors (no memory, no arithmetic): EVA02-L's separate
    q/k/v and SwiGLU MLP, and the largest shipped recipe's open_clip ViT."""
    with torch.device("meta"):
        model, _, _ = create_fineclip(ModelConfig(name=name), device="meta")
    shapes = FineCLIPShapes.of(model.clip)
    images = torch.empty(2, 3, *model.image_size, device="meta")
    tokens = torch.zeros(2, shapes.text.tokens, dtype=torch.long, device="meta")

    def dense_path():
        global_embedding, dense, _ = model.encode_image_and_dense(images)
        (global_embedding.sum() + dense.sum()).backward()

    def teacher():
        model.encode_image(images).sum().backward()

    def text():
        with torch.no_grad():
            model.encode_text(tokens)

    patch = shapes.patch_embed_flops
    image = flops.image_forward_flops(shapes)
    assert _count(dense_path) == 2 * flops._train(image + flops.dense_extra_forward_flops(shapes), patch)
    assert _count(teacher) == 2 * flops._train(image, patch)
    assert _count(text) == 2 * flops.text_forward_flops(shapes)


def test_contrastive_count_is_the_chunked_kernels():
    from kernels import contrastive_loss
    from fineclip_ds.models.flops import contrastive_flops

    rows, dim = 300, 64  # several tiles
    images = F.normalize(torch.randn(rows, dim), dim=-1).requires_grad_()
    texts = F.normalize(torch.randn(rows, dim), dim=-1).requires_grad_()
    with FlopCounterMode(display=False) as counter:
        contrastive_loss(images, texts, torch.tensor([10.0], requires_grad=True), backend="torch").backward()
    assert counter.get_total_flops() == contrastive_flops(rows, rows, dim)
