import torch

from fineclip_ds.losses.regional_contrastive import RegionalContrastiveLoss
from tests.losses.naive import naive_infonce, unit_rows


def test_masked_regions_match_naive_formula_over_valid_regions_only():
    regions, texts = unit_rows(3, 4, 6, seed=1), unit_rows(3, 4, 6, seed=2)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    scale = torch.tensor([20.0], dtype=torch.float64, requires_grad=True)
    ours = RegionalContrastiveLoss()(regions, texts, mask, scale)
    grads = torch.autograd.grad(ours, (regions, texts, scale))
    reference = naive_infonce(regions.reshape(-1, 6), texts.reshape(-1, 6), scale[0], mask.reshape(-1))
    expected = torch.autograd.grad(reference, (regions, texts, scale))
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert grads[0][~mask].abs().max() == 0  # padded boxes get no gradient


def test_padded_values_do_not_leak_into_the_loss():
    regions, texts = unit_rows(2, 3, 5, seed=3), unit_rows(2, 3, 5, seed=4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    scale = torch.tensor([10.0], dtype=torch.float64)
    before = RegionalContrastiveLoss()(regions, texts, mask, scale)
    garbage_regions, garbage_texts = regions.detach().clone(), texts.detach().clone()
    garbage_regions[~mask] = 7.0
    garbage_texts[~mask] = -3.0
    after = RegionalContrastiveLoss()(garbage_regions, garbage_texts, mask, scale)
    torch.testing.assert_close(before, after)


def test_no_valid_region_gives_zero_loss_and_finite_gradient():
    regions, texts = unit_rows(2, 3, 5, seed=5), unit_rows(2, 3, 5, seed=6)
    scale = torch.tensor([10.0], dtype=torch.float64, requires_grad=True)
    loss = RegionalContrastiveLoss()(regions, texts, torch.zeros(2, 3, dtype=torch.bool), scale)
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(regions.grad).all() and torch.isfinite(scale.grad).all()


def test_the_triton_backend_masks_regions_like_the_naive_formula():
    regions, texts = unit_rows(3, 4, 6, seed=5), unit_rows(3, 4, 6, seed=6)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    scale = torch.tensor([20.0], dtype=torch.float64, requires_grad=True)
    inputs = [t.detach().float().requires_grad_() for t in (regions, texts, scale)]
    ours = RegionalContrastiveLoss(backend="triton")(inputs[0], inputs[1], mask, inputs[2])
    grads = torch.autograd.grad(ours, inputs)
    reference = naive_infonce(regions.reshape(-1, 6), texts.reshape(-1, 6), scale[0], mask.reshape(-1))
    expected = torch.autograd.grad(reference, (regions, texts, scale))
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert grads[0][~mask].abs().max() == 0
