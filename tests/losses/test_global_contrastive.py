import pytest
import torch

from fineclip_ds.losses.global_contrastive import GlobalContrastiveLoss
from tests.losses.naive import naive_infonce, unit_rows


@pytest.mark.parametrize("rows,dim,scale", [(1, 3, 1.0), (5, 7, 14.3), (12, 16, 100.0)])
def test_matches_naive_formula_values_and_gradients(rows, dim, scale):
    images, texts = unit_rows(rows, dim, seed=rows), unit_rows(rows, dim, seed=rows + 100)
    logit_scale = torch.tensor([scale], dtype=torch.float64, requires_grad=True)
    ours = GlobalContrastiveLoss()(images, texts, logit_scale)
    grads = torch.autograd.grad(ours, (images, texts, logit_scale))
    reference = naive_infonce(images, texts, logit_scale[0])
    expected = torch.autograd.grad(reference, (images, texts, logit_scale))
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_perfect_alignment_gives_low_loss_and_shuffle_raises_it():
    images = unit_rows(8, 8, seed=0).detach()
    scale = torch.tensor([100.0], dtype=torch.float64)
    aligned = GlobalContrastiveLoss()(images, images, scale)
    shuffled = GlobalContrastiveLoss()(images, images.roll(1, 0), scale)
    assert aligned < 0.5 < shuffled


@pytest.mark.parametrize("backend", ["torch", "triton"])  # triton: the chunked kernel, interpreted on CPU
def test_both_kernel_backends_meet_the_naive_formula_in_float32(backend):
    images, texts = unit_rows(9, 20, seed=3), unit_rows(9, 20, seed=4)
    logit_scale = torch.tensor([30.0], dtype=torch.float64, requires_grad=True)
    inputs = [t.detach().float().requires_grad_() for t in (images, texts, logit_scale)]
    ours = GlobalContrastiveLoss(backend=backend)(*inputs)
    grads = torch.autograd.grad(ours, inputs)
    reference = naive_infonce(images, texts, logit_scale[0])
    expected = torch.autograd.grad(reference, (images, texts, logit_scale))
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
