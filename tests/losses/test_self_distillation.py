import torch

from fineclip_ds.losses.self_distillation import SelfDistillationLoss
from tests.losses.naive import naive_self_distillation, unit_rows


def test_matches_naive_formula_values_and_gradients():
    regions = unit_rows(3, 5, 8, seed=7)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    teachers = unit_rows(int(mask.sum()), 8, seed=8)
    ours = SelfDistillationLoss()(regions, teachers, mask)
    grads = torch.autograd.grad(ours, (regions, teachers))
    reference = naive_self_distillation(regions, teachers, mask)
    expected = torch.autograd.grad(reference, (regions, teachers))
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_identical_features_give_zero_and_opposite_give_two():
    regions = unit_rows(1, 2, 4, seed=9).detach()
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert SelfDistillationLoss()(regions, regions[0], mask).abs() < 1e-12
    torch.testing.assert_close(SelfDistillationLoss()(regions, -regions[0], mask), torch.tensor(2.0, dtype=torch.float64))


def test_no_valid_region_gives_zero_loss_and_zero_gradients():
    regions = unit_rows(2, 3, 4, seed=10)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    teachers = unit_rows(0, 4, seed=11)
    loss = SelfDistillationLoss()(regions, teachers, mask)
    (grad,) = torch.autograd.grad(loss, regions)
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))
