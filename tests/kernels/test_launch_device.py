"""Every Triton launch runs on its tensors' device, not on whichever CUDA device happens to be current.

Triton launches on `torch.cuda.current_device()` (triton.runtime.jit.JITFunction.run), so tensors on
cuda:1 while cuda:0 is current would be read from the wrong GPU. Without a GPU the launchers' use of
`kernels.device.launch_device` is checked by recording, around each real launch (interpreted, or compiled on
a GPU: tests/kernels/conftest.py), which device the guard made current; the two-GPU test runs it for real
where there are two.
"""
from __future__ import annotations

import contextlib
import types

import pytest
import torch

import kernels.device
from kernels.contrastive import contrastive_loss
from kernels.contrastive import launch as contrastive_launch
from kernels.roi_pool import region_pool
from kernels.roi_pool import launch as roi_pool_launch

KERNELS = {
    roi_pool_launch: ("region_factors_kernel", "region_pool_fwd_kernel", "region_pool_bwd_kernel"),
    contrastive_launch: ("stats_partials_kernel", "merge_partials_kernel", "finish_partials_kernel", "row_terms_kernel",
                         "grad_logits_kernel", "grad_partials_kernel"),
}


def test_launch_device_makes_the_tensors_cuda_device_current(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(kernels.device.torch.cuda, "device", fake_device)
    with kernels.device.launch_device(types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))):
        assert entered == [torch.device("cuda", 1)]
    with kernels.device.launch_device(torch.zeros(1, device="cpu")):  # CPU (interpreter) tensors: nothing to switch
        pass
    assert entered == [torch.device("cuda", 1)]


@pytest.fixture
def launches(monkeypatch):
    """(kernel name, device made current by the guard, devices of the tensor arguments) per launch."""
    current: list[torch.device] = []
    seen: list[tuple[str, torch.device | None, set[torch.device]]] = []

    @contextlib.contextmanager
    def recording_guard(tensor):
        current.append(tensor.device)
        try:
            yield
        finally:
            current.pop()

    class Recorded:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                devices = {arg.device for arg in (*args, *kwargs.values()) if isinstance(arg, torch.Tensor)}
                seen.append((self.name, current[-1] if current else None, devices))
                return self.kernel[grid](*args, **kwargs)
            return launch

    for module, names in KERNELS.items():
        monkeypatch.setattr(module, "launch_device", recording_guard, raising=False)  # a launcher without it fails below
        for name in names:
            monkeypatch.setattr(module, name, Recorded(name, getattr(module, name)))
    return seen


@pytest.mark.parametrize("normalize", [False, True])
def test_region_pool_launches_run_under_their_tensors_device(launches, normalize):
    tokens = torch.randn(2, 12, 5, requires_grad=True)
    boxes = torch.tensor([[[0.0, 0.0, 3.0, 2.0]], [[1.0, 1.0, 4.0, 3.0]]])
    region_pool(tokens, boxes, (3, 4), 1.0, normalize=normalize, backend="triton").sum().backward()
    assert {name for name, _, _ in launches} == set(KERNELS[roi_pool_launch])
    for name, guarded, devices in launches:
        assert devices == {guarded}, (name, guarded, devices)


@pytest.mark.parametrize("dtype, backward_kernel", [(torch.float32, "grad_logits_kernel"),
                                                    (torch.float16, "grad_partials_kernel")], ids=str)
def test_contrastive_launches_run_under_their_tensors_device(launches, dtype, backward_kernel):
    images = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1).to(dtype).requires_grad_()
    texts = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1).to(dtype).requires_grad_()
    contrastive_loss(images, texts, torch.tensor(10.0), backend="triton").backward()
    # one process: no merge of column groups before the ranks merge theirs
    assert {name for name, _, _ in launches} == {"stats_partials_kernel", "finish_partials_kernel", "row_terms_kernel",
                                                 backward_kernel}
    for name, guarded, devices in launches:
        assert devices == {guarded}, (name, guarded, devices)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_tensors_on_a_device_that_is_not_current_get_the_same_results():
    with torch.device("cpu"):
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randn(2, 35, 64, generator=generator)
        boxes = torch.rand(2, 5, 4, generator=generator) * 20
        images = torch.nn.functional.normalize(torch.randn(300, 64, generator=generator), dim=-1)
        texts = torch.nn.functional.normalize(torch.randn(300, 64, generator=generator), dim=-1)

    def run(device: str) -> list[torch.Tensor]:
        leaves = [t.to(device).requires_grad_() for t in (tokens, images, texts)]
        pooled = region_pool(leaves[0], boxes.to(device), (5, 7), 0.25, normalize=True, backend="triton")
        loss = contrastive_loss(leaves[1], leaves[2], torch.tensor(10.0, device=device), backend="triton")
        (pooled.square().sum() + loss).backward()
        torch.cuda.synchronize(device)
        return [t.cpu() for t in (pooled, loss, *(leaf.grad for leaf in leaves))]

    with torch.cuda.device(1):
        want = run("cuda:1")
    with torch.cuda.device(0):
        got = run("cuda:1")
    for got_tensor, want_tensor in zip(got, want):
        assert torch.equal(got_tensor, want_tensor)
