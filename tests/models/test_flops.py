"""The analytic FLOPs of a whole FineCLIP step against torch's FlopCounterMode (within 5%)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fineclip_ds.config import KernelConfig, LossConfig, ModelConfig
from fineclip_ds.losses.objective import FineCLIPObjective
from fineclip_ds.models.factory import create_fineclip
from fineclip_ds.models.flops import FineCLIPShapes, step_flops


def _batch(tokenizer, images: int, slots: int, valid: list[int]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    boxes = torch.tensor([4.0, 6.0, 40.0, 50.0]).repeat(images, slots, 1)
    box_mask = torch.zeros(images, slots, dtype=torch.bool)
    for row, count in enumerate(valid):
        box_mask[row, :count] = True
    return {
        "images": torch.randn(images, 3, 64, 64, generator=generator),
        "texts": tokenizer(["a photo"] * images),
        "boxes": boxes,
        "box_mask": box_mask,
        "region_texts": tokenizer(["a region"] * images * slots).view(images, slots, -1),
    }


@pytest.mark.parametrize("freeze_text,sd_teacher_grad,weights", [
    (False, True, {"w_gc": 1.0, "w_sd": 1.0, "w_rc": 1.0}),
    (True, True, {"w_gc": 1.0, "w_sd": 1.0, "w_rc": 1.0}),
    (True, False, {"w_gc": 1.0, "w_sd": 1.0, "w_rc": 0.0}),
    (True, True, {"w_gc": 1.0, "w_sd": 0.0, "w_rc": 0.0}),
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


def test_contrastive_count_is_the_chunked_kernels():
    from kernels import contrastive_loss
    from fineclip_ds.models.flops import contrastive_flops

    rows, dim = 300, 64  # several tiles
    images = F.normalize(torch.randn(rows, dim), dim=-1).requires_grad_()
    texts = F.normalize(torch.randn(rows, dim), dim=-1).requires_grad_()
    with FlopCounterMode(display=False) as counter:
        contrastive_loss(images, texts, torch.tensor([10.0], requires_grad=True), backend="torch").backward()
    assert counter.get_total_flops() == contrastive_flops(rows, rows, dim)
