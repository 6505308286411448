"""Region pooling against torchvision's roi_align in float64: values and token gradients, both backends.

Under TRITON_INTERPRET=1 (tests/conftest.py) the Triton backend runs on the CPU interpreter, so
shapes stay small; on a GPU the same cases run compiled there (tests/kernels/kernel_device.py). Box
kinds cover the rules torchvision applies at the map borders, at every scale: box coordinates go to grid
units in float64 as in the reference, so a box of a whole number of cells at a scale such as 1/14 gets
ceil(size) samples, not one more from float32 rounding.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

import kernels
from kernels.roi_pool import RegionPool, region_pool
from kernels.roi_pool.api import chooses_triton
from kernels.roi_pool.function import RegionPoolFunction
from kernels.roi_pool.launch import normalize_in_second_pass
from tests.kernels.kernel_device import KERNEL_DEVICE, drawn_on_the_cpu

BACKENDS = ("triton", "torch")
# fp32: the pooling weights are stored in float32 (computed in float64), ~1e-7 relative.
# bf16 / fp16: the output and gradient are rounded to the dtype (8 / 11 significant bits); on a GPU
# TF32 also truncates the pooling weights by up to 2^-10, and in the interpreter the kernels' fp32 -> bf16
# stores truncate (a GPU rounds them to nearest).
TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
    torch.float16: {"rtol": 3e-3, "atol": 3e-3},
}
BOX_KINDS = ("inside", "border", "partly_outside", "subpixel", "zero_size", "outside")

# (seed, batch, regions, (H, W), channels, spatial_scale)
CASES = [
    (0, 2, 5, (7, 9), 33, 0.25),
    (1, 3, 6, (9, 11), 40, 9 / 37),
    (2, 1, 4, (5, 3), 17, 0.5),
    (3, 2, 3, (1, 7), 3, 1.0),
    (4, 3, 6, (11, 9), 20, 0.125),
    (5, 2, 6, (8, 5), 1, 3 / 32),
    (6, 1, 1, (3, 3), 7, 0.3),
    (7, 2, 6, (9, 9), 24, 1 / 16),
]


def random_boxes(generator: torch.Generator, batch: int, regions: int, grid_hw: tuple[int, int],
                 spatial_scale: float) -> torch.Tensor:
    """Boxes of every kind in BOX_KINDS, cycling so each case holds a mix."""
    # -> [B, R, 4] xyxy float32 pixels of an image of grid_hw / spatial_scale
    cell = 1 / spatial_scale
    image = torch.tensor([grid_hw[1], grid_hw[0]]) * cell
    boxes = []
    for index in range(batch * regions):
        kind = BOX_KINDS[index % len(BOX_KINDS)]
        u = torch.rand(4, generator=generator)
        low, high = torch.minimum(u[:2], u[2:]) * image, torch.maximum(u[:2], u[2:]) * image
        if kind == "border":
            low = torch.where(u[:2] < 0.5, 0.0, low)  # each side either on the border or free
            high = torch.where(u[2:] < 0.5, image, high)
        elif kind == "partly_outside":
            low, high = low * 1.6 - 0.5 * image, high * 1.6 - 0.1 * image
        elif kind == "subpixel":
            high = low + u[2:] * 0.9 * cell
        elif kind == "zero_size":
            point = (index // len(BOX_KINDS)) % 2 == 1
            high = low.clone() if point else torch.stack([low[0], high[1]])  # a point, or a vertical line
        elif kind == "outside":
            low, high = low + 1.3 * image, high + 1.3 * image
        boxes.append(torch.cat([low, high]))
    return torch.stack(boxes).view(batch, regions, 4)


def make_case(seed: int, batch: int, regions: int, grid_hw: tuple[int, int], channels: int, spatial_scale: float,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, boxes, a box mask with some padding (a whole image when batch > 1) and a gradient probe."""
    # -> tokens [B, H*W, C] dtype, boxes [B, R, 4] fp32, box_mask [B, R] bool, probe [B, R, C] dtype
    with drawn_on_the_cpu() as device:
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randn(batch, grid_hw[0] * grid_hw[1], channels, generator=generator).to(dtype)
        boxes = random_boxes(generator, batch, regions, grid_hw, spatial_scale)
        box_mask = torch.rand(batch, regions, generator=generator) < 0.8
        if batch > 1:
            box_mask[-1] = False
        probe = torch.randn(batch, regions, channels, generator=generator).to(dtype)
    return tokens.to(device), boxes.to(device), box_mask.to(device), probe.to(device)


def torchvision_reference(tokens: torch.Tensor, boxes: torch.Tensor, grid_hw: tuple[int, int], spatial_scale: float,
                          box_mask: torch.Tensor, sampling_ratio: int, normalize: bool,
                          aligned: bool = True) -> torch.Tensor:
    """The contract, in float64: roi_align on the NCHW view, masked rows zeroed, then F.normalize."""
    # tokens: [B, H*W, C]; boxes: [B, R, 4] -> [B, R, C] float64
    batch, regions = boxes.shape[:2]
    channels = tokens.shape[-1]
    feature_map = tokens.double().transpose(1, 2).reshape(batch, channels, *grid_hw)
    pooled = roi_align(feature_map, list(boxes.double()), output_size=1, spatial_scale=spatial_scale,
                       sampling_ratio=sampling_ratio, aligned=aligned).view(batch, regions, channels)
    pooled = pooled * box_mask[..., None]
    return F.normalize(pooled, dim=-1, eps=1e-12) if normalize else pooled


def pooled_and_grad(tokens: torch.Tensor, probe: torch.Tensor, pool) -> tuple[torch.Tensor, torch.Tensor]:
    """Output of `pool(tokens)` and the gradient of <output, probe> with respect to the tokens."""
    tokens = tokens.detach().clone().requires_grad_()
    pooled = pool(tokens)
    (grad,) = torch.autograd.grad((pooled.double() * probe.double()).sum(), tokens)
    return pooled, grad


def check_against_torchvision(case, dtype: torch.dtype, backend: str, normalize: bool, sampling_ratio: int) -> None:
    seed, batch, regions, grid_hw, channels, spatial_scale = case
    tokens, boxes, box_mask, probe = make_case(seed, batch, regions, grid_hw, channels, spatial_scale, dtype)
    got, got_grad = pooled_and_grad(tokens, probe, lambda t: region_pool(
        t, boxes, grid_hw, spatial_scale, box_mask, sampling_ratio, normalize, backend))
    want, want_grad = pooled_and_grad(tokens.double(), probe, lambda t: torchvision_reference(
        t, boxes, grid_hw, spatial_scale, box_mask, sampling_ratio, normalize))
    assert got.dtype == dtype and got.shape == (batch, regions, channels)
    assert got_grad.dtype == dtype
    torch.testing.assert_close(got.double(), want, **TOLERANCES[dtype])
    torch.testing.assert_close(got_grad.double(), want_grad, **TOLERANCES[dtype])


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: f"seed{case[0]}")
def test_fp32_matches_torchvision_float64(case, backend, normalize, sampling_ratio):
    check_against_torchvision(case, torch.float32, backend, normalize, sampling_ratio)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES[:3], ids=lambda case: f"seed{case[0]}")
def test_half_precision_matches_torchvision_float64(case, dtype, backend, normalize):
    check_against_torchvision(case, dtype, backend, normalize, sampling_ratio=-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_box_kind_is_exercised_and_nonzero_where_it_should_be(backend):
    """Guards the generator: inside/border/partly-outside/subpixel boxes pool something, outside ones nothing."""
    seed, batch, regions, grid_hw, channels, spatial_scale = CASES[0]
    tokens, boxes, _, _ = make_case(seed, 1, 12, grid_hw, channels, spatial_scale, torch.float32)
    pooled = region_pool(tokens, boxes, grid_hw, spatial_scale, backend=backend)
    nonzero = pooled.abs().sum(-1) > 0
    for index in range(12):
        kind = BOX_KINDS[index % len(BOX_KINDS)]
        assert bool(nonzero[0, index]) == (kind not in ("outside", "zero_size")), (kind, boxes[0, index])


@pytest.mark.parametrize("sampling_ratio", [-1, 1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_samples_on_the_border_limits_follow_torchvision(backend, sampling_ratio):
    """One-sample boxes centred exactly on -1 and on H / W count (clamped onto the edge); just beyond, they do not."""
    height, width = 3, 4
    centres = torch.tensor([[-1, 1], [width, 1], [1, -1], [1, height], [-1, -1], [width, height], [-0.5, 2.5],
                            [-1.25, 1], [width + 0.25, 1], [1, -1.25], [1, height + 0.25], [3.5, 0], [0.5, 2]])
    centres = centres + 0.5  # grid coordinates -> pixels at scale 1 with aligned=True
    boxes = torch.cat([centres - 0.5, centres + 0.5], dim=-1)[None]
    tokens = torch.randn(1, height * width, 5)
    mask = torch.ones(1, boxes.shape[1], dtype=torch.bool)
    got = region_pool(tokens, boxes, (height, width), 1.0, sampling_ratio=sampling_ratio, backend=backend)
    want = torchvision_reference(tokens, boxes, (height, width), 1.0, mask, sampling_ratio, False)
    torch.testing.assert_close(got.double(), want, **TOLERANCES[torch.float32])
    assert (got[0, :7].abs().sum(-1) > 0).all() and (got[0, 7:11] == 0).all()


# (image size, grid, box): the vit-l-14-336 and vit-l-14 recipes (patch 14, scale 1/14)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("image, grid, box", [
    (336, 24, [0.0, 0.0, 336.0, 336.0]),  # the whole image: 25 samples a side in float32, 24 in float64
    (224, 16, [140.0, 0.0, 154.0, 224.0]),  # one patch wide: 2 samples across in float32, 1 in float64
])
def test_patch_aligned_boxes_at_a_scale_of_one_fourteenth_follow_torchvision_float64(backend, normalize, image, grid,
                                                                                     box):
    """In float32, x * (1/14) - 0.5 put a whole number of cells one ulp above it and ceil() took one sample more per
    axis than the float64 contract: up to 4.8x off for the one-patch box."""
    tokens = torch.randn(1, grid * grid, 8, generator=torch.Generator().manual_seed(0), device="cpu").to(KERNEL_DEVICE)
    boxes, mask = torch.tensor([[box]]), torch.ones(1, 1, dtype=torch.bool)
    got = region_pool(tokens, boxes, (grid, grid), grid / image, normalize=normalize, backend=backend)
    want = torchvision_reference(tokens, boxes, (grid, grid), grid / image, mask, -1, normalize)
    torch.testing.assert_close(got.double(), want, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_point_and_line_boxes_pool_with_a_fixed_sampling_ratio(backend):
    """A zero-size box has no adaptive samples (zero row) but a fixed ratio still samples its point."""
    tokens = torch.randn(1, 15, 4)
    boxes = torch.tensor([[[4.0, 6.0, 4.0, 6.0]]])
    adaptive = region_pool(tokens, boxes, (3, 5), 0.5, sampling_ratio=-1, backend=backend)
    fixed = region_pool(tokens, boxes, (3, 5), 0.5, sampling_ratio=2, backend=backend)
    torch.testing.assert_close(adaptive, torch.zeros_like(adaptive))
    torch.testing.assert_close(fixed[0, 0], tokens.view(3, 5, 4)[2, 1] * 0.5 + tokens.view(3, 5, 4)[2, 2] * 0.5)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_boxes_give_zero_rows_and_zero_gradient(backend, normalize):
    tokens, boxes, _, probe = make_case(11, 2, 4, (5, 7), 9, 0.25, torch.float32)
    box_mask = torch.tensor([[True, False, True, False], [False, False, False, False]])
    pooled, grad = pooled_and_grad(tokens, probe, lambda t: region_pool(
        t, boxes, (5, 7), 0.25, box_mask, normalize=normalize, backend=backend))
    assert torch.equal(pooled[~box_mask], torch.zeros_like(pooled[~box_mask]))
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))
    _, grad_kept = pooled_and_grad(tokens, probe * box_mask[..., None], lambda t: region_pool(
        t, boxes, (5, 7), 0.25, box_mask, normalize=normalize, backend=backend))
    torch.testing.assert_close(grad, grad_kept, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_regions_gives_an_empty_output_and_zero_gradient(backend):
    tokens = torch.randn(2, 12, 5, requires_grad=True)
    pooled = region_pool(tokens, torch.zeros(2, 0, 4), (3, 4), 0.5, backend=backend)
    assert pooled.shape == (2, 0, 5)
    pooled.sum().backward()
    assert torch.equal(tokens.grad, torch.zeros_like(tokens))


@pytest.mark.parametrize("backend", BACKENDS)
def test_boxes_get_no_gradient(backend):
    tokens, boxes, box_mask, _ = make_case(12, 2, 3, (5, 5), 6, 0.5, torch.float32)
    tokens.requires_grad_()
    boxes.requires_grad_()
    region_pool(tokens, boxes, (5, 5), 0.5, box_mask, backend=backend).sum().backward()
    assert boxes.grad is None and tokens.grad is not None


def test_triton_backward_is_bitwise_deterministic():
    tokens, boxes, box_mask, probe = make_case(13, 3, 6, (9, 11), 40, 0.25, torch.float32)
    pool = lambda t: region_pool(t, boxes, (9, 11), 0.25, box_mask, normalize=True, backend="triton")  # noqa: E731
    _, first = pooled_and_grad(tokens, probe, pool)
    _, second = pooled_and_grad(tokens, probe, pool)
    assert torch.equal(first, second)


@pytest.mark.parametrize("normalize", [False, True])
def test_triton_reads_strided_tokens_in_place(normalize):
    """A channel slice of a wider map (non-unit strides) pools like its contiguous copy."""
    tokens, boxes, box_mask, probe = make_case(14, 2, 4, (7, 5), 10, 0.5, torch.float32)
    wide = torch.randn(2, 35, 25)
    wide[..., 3:23:2] = tokens
    strided = wide[..., 3:23:2]
    assert not strided.is_contiguous()
    pool = lambda t: region_pool(t, boxes, (7, 5), 0.5, box_mask, normalize=normalize, backend="triton")  # noqa: E731
    got, got_grad = pooled_and_grad(strided, probe, pool)
    want, want_grad = pooled_and_grad(tokens, probe, pool)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0)


def steps_of(dtype: torch.dtype, value: torch.Tensor) -> torch.Tensor:
    """The spacing of `dtype`'s values around each of `value` (float64), subnormals included."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(value.abs().clamp_min(info.tiny))
    return info.eps * torch.exp2((exponent - 1).double())


@pytest.mark.skipif(KERNEL_DEVICE.type == "cuda", reason="exact fp32 dots only in the interpreter: on a GPU "
                    "TF32 truncates the weights by up to 2^-10, a quarter of a bf16 step")
@pytest.mark.parametrize("second_pass", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_normalised_half_precision_rows_are_rounded_once(dtype, second_pass):
    """Normalised rows are pooled and rescaled in fp32 and rounded to bf16/fp16 once: every value of at least 0.01
    is within half a step of the float64 contract, over several seeds (smaller ones carry the fp32 sums' own
    error, which near zero can exceed half an fp16 step). The fused kernel used to store the pooled row in the
    dtype before the rescale too, up to a step off on a GPU; in the interpreter, whose fp32 -> bf16 stores
    truncate, 87% of bf16 values were over half a step off (up to 2.6 steps), and 27% of fp16 ones (up to 1.2)."""
    for seed in range(16, 20):
        batch, regions, grid_hw, channels, spatial_scale = 2, 6, (7, 9), 150, 0.25
        tokens, boxes, box_mask, _ = make_case(seed, batch, regions, grid_hw, channels, spatial_scale, dtype)
        got = RegionPoolFunction.apply(tokens, boxes, box_mask, grid_hw, spatial_scale, -1, True, second_pass)
        want = torchvision_reference(tokens.double(), boxes, grid_hw, spatial_scale, box_mask, -1, True)
        assert got.dtype == dtype
        large = want.abs() >= 1e-2
        assert large.sum() > 100, seed
        error_in_steps = (got.double() - want).abs()[large] / steps_of(dtype, want[large])
        assert error_in_steps.max() <= 0.51, seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_second_pass_normalisation_matches_torchvision_float64(dtype):
    """The split path (channel tiles over programs, then a torch normalise) that GPUs take at small
    batches, forced here: over two channel tiles, values and token gradients meet the contract."""
    channels = 70 if dtype == torch.float32 else 130  # two tiles of 64 (fp32) / 128 (half precision)
    seed, batch, regions, grid_hw, spatial_scale = 15, 2, 5, (7, 9), 0.25
    tokens, boxes, box_mask, probe = make_case(seed, batch, regions, grid_hw, channels, spatial_scale, dtype)
    pools = {second_pass: lambda t, second_pass=second_pass: RegionPoolFunction.apply(
        t, boxes, box_mask, grid_hw, spatial_scale, -1, True, second_pass) for second_pass in (True, False)}
    got, got_grad = pooled_and_grad(tokens, probe, pools[True])
    want, want_grad = pooled_and_grad(tokens.double(), probe, lambda t: torchvision_reference(
        t, boxes, grid_hw, spatial_scale, box_mask, -1, True))
    assert got.dtype == dtype and got_grad.dtype == dtype
    torch.testing.assert_close(got.double(), want, **TOLERANCES[dtype])
    torch.testing.assert_close(got_grad.double(), want_grad, **TOLERANCES[dtype])
    fused, fused_grad = pooled_and_grad(tokens, probe, pools[False])
    torch.testing.assert_close(got, fused, **TOLERANCES[dtype])
    torch.testing.assert_close(got_grad, fused_grad, **TOLERANCES[dtype])


@pytest.mark.parametrize("box_programs, channel_tiles, multiprocessors, split", [
    (32, 8, 132, True),  # 32 images, <= 64 boxes each, C = 1024 on an H100
    (132, 8, 132, False),  # every SM already has a program
    (32, 1, 132, False),  # one channel tile: nothing to split
    (32, 8, None, False),  # the CPU interpreter
])
def test_second_pass_is_chosen_only_when_programs_are_fewer_than_sms(box_programs, channel_tiles, multiprocessors,
                                                                       split):
    assert normalize_in_second_pass(box_programs, channel_tiles, multiprocessors) is split


def test_the_comparison_detects_a_half_pixel_shift():
    """The tolerances are tight enough to tell aligned=True from aligned=False (off by half a pixel)."""
    seed, batch, regions, grid_hw, channels, spatial_scale = CASES[0]
    tokens, boxes, box_mask, _ = make_case(seed, batch, regions, grid_hw, channels, spatial_scale, torch.float32)
    got = region_pool(tokens, boxes, grid_hw, spatial_scale, box_mask, backend="torch").double()
    shifted = torchvision_reference(tokens, boxes, grid_hw, spatial_scale, box_mask, -1, False, aligned=False)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got, shifted, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend", ["cuda", "Triton", "", None])
def test_unknown_backend_raises_value_error_naming_it(backend):
    tokens, boxes = torch.randn(1, 4, 3), torch.tensor([[[0.0, 0.0, 2.0, 2.0]]])
    with pytest.raises(ValueError, match=repr(backend)):
        kernels.region_pool(tokens, boxes, (2, 2), 1.0, backend=backend)
    with pytest.raises(ValueError, match=repr(backend)):
        RegionPool((2, 2), 1.0, backend=backend)


def test_triton_rejects_float64_tokens_naming_the_dtype():
    with pytest.raises(ValueError, match="float64"):
        region_pool(torch.randn(1, 4, 3, dtype=torch.float64), torch.zeros(1, 1, 4), (2, 2), 1.0, backend="triton")


def test_grid_that_does_not_match_the_tokens_raises():
    with pytest.raises(ValueError, match="grid_hw"):
        region_pool(torch.randn(1, 12, 3), torch.zeros(1, 1, 4), (3, 5), 1.0)
    for grid_hw in [(12,), (3, 4, 1)]:  # was a bare "not enough / too many values to unpack"
        with pytest.raises(ValueError, match=r"grid_hw: got .*expected \(H, W\)"):
            region_pool(torch.randn(1, 12, 3), torch.zeros(1, 1, 4), grid_hw, 1.0)


@pytest.mark.parametrize("grid_hw", [6, (6,), (2, 3, 1)])
def test_module_with_a_grid_of_other_than_two_sizes_raises_naming_grid_hw(grid_hw):
    """RegionPool(6, ...) failed with a bare "TypeError: 'int' object is not iterable" from its constructor."""
    with pytest.raises(ValueError, match=r"grid_hw: got .*expected \(H, W\)"):
        RegionPool(grid_hw, 1.0)(torch.randn(1, 6, 3), torch.tensor([[[0.0, 0.0, 2.0, 2.0]]]))


def test_auto_backend_runs_torch_on_cpu(monkeypatch):
    import kernels.roi_pool.api as api

    calls = []

    def record(*args):
        calls.append(args)
        return torch.zeros(1, 1, 3)

    monkeypatch.setattr(api, "region_pool_torch", record)
    region_pool(torch.randn(1, 4, 3, device="cpu"), torch.zeros(1, 1, 4, device="cpu"), (2, 2), 1.0, backend="auto")
    assert len(calls) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_and_entry_point_match_the_function(backend):
    seed, batch, regions, grid_hw, channels, spatial_scale = CASES[2]
    tokens, boxes, box_mask, _ = make_case(seed, batch, regions, grid_hw, channels, spatial_scale, torch.float32)
    module = RegionPool(grid_hw, spatial_scale, sampling_ratio=2, normalize=True, backend=backend)
    want = region_pool(tokens, boxes, grid_hw, spatial_scale, box_mask, 2, True, backend)
    assert torch.equal(module(tokens, boxes, box_mask), want)
    assert torch.equal(kernels.region_pool(tokens, boxes, grid_hw, spatial_scale, box_mask, 2, True, backend), want)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# (seed, batch, regions, (H, W), channels, spatial_scale): model-sized maps, boxes and widths
GPU_CASES = [
    (20, 8, 37, (14, 14), 768, 14 / 224),
    (21, 4, 100, (23, 17), 1000, 1 / 16),
    (22, 2, 64, (40, 40), 1024, 40 / 640),
]


def _to_cuda(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(tensor.cuda() for tensor in tensors)


@requires_cuda
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda case: f"seed{case[0]}")
def test_gpu_triton_matches_torchvision_float64(case, dtype, normalize):
    seed, batch, regions, grid_hw, channels, spatial_scale = case
    tokens, boxes, box_mask, probe = _to_cuda(*make_case(seed, batch, regions, grid_hw, channels, spatial_scale, dtype))
    got, got_grad = pooled_and_grad(tokens, probe, lambda t: region_pool(
        t, boxes, grid_hw, spatial_scale, box_mask, normalize=normalize, backend="triton"))
    want, want_grad = pooled_and_grad(tokens.double(), probe, lambda t: torchvision_reference(
        t, boxes, grid_hw, spatial_scale, box_mask, -1, normalize))
    torch.testing.assert_close(got.double(), want, **TOLERANCES[dtype])
    torch.testing.assert_close(got_grad.double(), want_grad, **TOLERANCES[dtype])


@requires_cuda
def test_gpu_triton_backward_is_bitwise_deterministic():
    seed, batch, regions, grid_hw, channels, spatial_scale = GPU_CASES[1]
    tokens, boxes, box_mask, probe = _to_cuda(*make_case(
        seed, batch, regions, grid_hw, channels, spatial_scale, torch.bfloat16))
    pool = lambda t: region_pool(t, boxes, grid_hw, spatial_scale, box_mask, normalize=True)  # noqa: E731
    grads = [pooled_and_grad(tokens, probe, pool)[1] for _ in range(3)]
    assert all(torch.equal(grads[0], grad) for grad in grads[1:])


def test_auto_takes_torch_for_cuda_tokens_of_a_dtype_without_kernels():
    """backend='auto' on CUDA float64 tokens (a gradcheck) raised 'the triton backend expects one of ...', a backend
    nobody had asked for; by name, 'triton' still refuses them (test_a_wrong_argument_is_named...)."""
    def cuda_tokens(dtype: torch.dtype) -> SimpleNamespace:  # the choice reads only .is_cuda and .dtype
        return SimpleNamespace(is_cuda=True, dtype=dtype)

    assert not chooses_triton("auto", cuda_tokens(torch.float64))
    assert all(chooses_triton("auto", cuda_tokens(dtype)) for dtype in (torch.float32, torch.bfloat16, torch.float16))
    assert chooses_triton("triton", cuda_tokens(torch.float64))
    assert not chooses_triton("auto", torch.zeros(1)) and not chooses_triton("torch", cuda_tokens(torch.float32))


@requires_cuda
def test_gpu_auto_pools_float64_tokens_with_torch():
    seed, batch, regions, grid_hw, channels, spatial_scale = GPU_CASES[0]
    tokens, boxes, box_mask, probe = _to_cuda(*make_case(
        seed, batch, regions, grid_hw, channels, spatial_scale, torch.float64))
    got = region_pool(tokens, boxes, grid_hw, spatial_scale, box_mask)
    want = torchvision_reference(tokens, boxes, grid_hw, spatial_scale, box_mask, -1, False)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_does_not_lower_the_precision_of_fp32_tokens(backend):
    """torchvision's roi_align runs in fp32 under autocast; so do both backends (the torch matmul was bf16)."""
    tokens, boxes, box_mask, probe = make_case(16, 2, 5, (7, 9), 24, 0.25, torch.float32)
    want = torchvision_reference(tokens, boxes, (7, 9), 0.25, box_mask, -1, False)
    with torch.autocast(KERNEL_DEVICE.type, dtype=torch.bfloat16):
        got = region_pool(tokens, boxes, (7, 9), 0.25, box_mask, backend=backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, **TOLERANCES[torch.float32])


def test_triton_refuses_second_order_gradients_instead_of_dropping_them():
    tokens, boxes, box_mask, _ = make_case(17, 2, 3, (5, 5), 8, 0.5, torch.float32)
    tokens.requires_grad_()
    pooled = region_pool(tokens, boxes, (5, 5), 0.5, box_mask, normalize=True, backend="triton")
    with pytest.raises(RuntimeError, match="no second-order gradient"):
        torch.autograd.grad(pooled.square().sum(), tokens, create_graph=True)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_boxes_stay_zero_next_to_nan_tokens_and_nan_upstream_gradients(backend, normalize):
    """Masked boxes' zero weights times a NaN token anywhere in the image made their rows NaN, and a NaN
    upstream gradient on their rows (zero weights times NaN) made every token's gradient NaN."""
    tokens, boxes, _, probe = make_case(18, 2, 4, (5, 7), 9, 0.25, torch.float32)
    box_mask = torch.tensor([[True, False, True, False], [False, True, False, False]])
    tokens[0, 3, 2] = float("nan")
    tokens[1, 30, 5] = float("inf")
    probe[~box_mask] = float("nan")
    pooled, grad = pooled_and_grad(tokens, probe, lambda t: region_pool(
        t, boxes, (5, 7), 0.25, box_mask, normalize=normalize, backend=backend))
    assert torch.equal(pooled[~box_mask], torch.zeros_like(pooled[~box_mask]))
    _, want_grad = pooled_and_grad(tokens, torch.where(box_mask[..., None], probe, 0.0), lambda t: region_pool(
        t, boxes, (5, 7), 0.25, box_mask, normalize=normalize, backend=backend))
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=0, equal_nan=True)
    if not normalize:  # the plain gradient never reads the tokens: nothing here may be NaN
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_boxes_with_a_non_finite_coordinate_pool_like_masked_ones(backend):
    """torchvision raises on them; here they gave a silent zero row on the CPU, and on a GPU their sample
    count (ceil(inf) cast to int) would have looped about 2**31 times."""
    tokens, boxes, box_mask, probe = make_case(19, 2, 5, (5, 7), 6, 0.25, torch.float32)
    box_mask[:] = True
    bad = torch.tensor([[False, True, False, True, False], [True, False, False, False, True]])
    boxes[0, 1, 2], boxes[0, 3, 0], boxes[1, 0, 3], boxes[1, 4, 1] = (float("inf"), float("nan"), float("-inf"),
                                                                     float("nan"))
    got, got_grad = pooled_and_grad(tokens, probe, lambda t: region_pool(t, boxes, (5, 7), 0.25, box_mask,
                                                                         backend=backend))
    clean = torch.where(bad[..., None], 0.0, boxes)
    want, want_grad = pooled_and_grad(tokens.double(), probe, lambda t: torchvision_reference(
        t, clean, (5, 7), 0.25, box_mask & ~bad, -1, False))
    assert torch.equal(got[bad], torch.zeros_like(got[bad]))
    torch.testing.assert_close(got.double(), want, **TOLERANCES[torch.float32])
    torch.testing.assert_close(got_grad.double(), want_grad, **TOLERANCES[torch.float32])
    unmasked = region_pool(tokens, boxes, (5, 7), 0.25, backend=backend)  # no box_mask given: the same rule
    torch.testing.assert_close(unmasked, got)
    tokens[1, 7, 2] = float("nan")  # like masked rows, theirs stay zero next to a NaN token
    only_bad = region_pool(tokens, boxes, (5, 7), 0.25, bad, backend=backend)
    assert torch.equal(only_bad, torch.zeros_like(only_bad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_sample_count_is_capped_per_axis(backend, monkeypatch):
    """With the cap at 3 points a side, adaptive sampling of boxes over 3 cells a side is a fixed ratio of 3:
    the cap that keeps an absurd finite box (1e30 px) from looping for hours on a GPU is applied by both paths."""
    import kernels.roi_pool.reference as reference

    monkeypatch.setattr(reference, "MAX_SAMPLES_PER_AXIS", 3)
    tokens, _, box_mask, probe = make_case(20, 2, 3, (9, 8), 5, 0.5, torch.float32)
    boxes = torch.tensor([[[0.0, 0.0, 16.0, 18.0], [2.5, 1.0, 13.0, 17.5], [-4.0, 3.0, 9.0, 20.0]],
                          [[1.0, 1.0, 15.0, 9.5], [0.0, 0.0, 16.0, 18.0], [3.0, 2.0, 11.0, 16.0]]])  # > 6 px a side
    got, got_grad = pooled_and_grad(tokens, probe, lambda t: region_pool(t, boxes, (9, 8), 0.5, box_mask,
                                                                         backend=backend))
    want, want_grad = pooled_and_grad(tokens.double(), probe, lambda t: torchvision_reference(
        t, boxes, (9, 8), 0.5, box_mask, 3, False))
    torch.testing.assert_close(got.double(), want, **TOLERANCES[torch.float32])
    torch.testing.assert_close(got_grad.double(), want_grad, **TOLERANCES[torch.float32])


BAD_CALLS = {
    "boxes as torchvision's list": (lambda t, b: region_pool(t, list(b), (2, 3), 1.0), "boxes: got a list"),
    "tokens as a list": (lambda t, b: region_pool(t.tolist(), b, (2, 3), 1.0), "tokens: got a list"),
    "integer tokens": (lambda t, b: region_pool(t.long(), b, (2, 3), 1.0, backend="torch"), "torch.int64"),
    "grid_hw an int": (lambda t, b: region_pool(t, b, 6, 1.0), r"grid_hw: got 6, expected \(H, W\)"),
    "negative grid_hw": (lambda t, b: region_pool(t, b, (-2, -3), 1.0), "expected positive"),
    "fractional grid_hw": (lambda t, b: region_pool(t, b, (1.5, 4.0), 1.0), r"grid_hw: got \(1.5, 4.0\), expected whole"),
    "two scales": (lambda t, b: region_pool(t, b, (2, 3), torch.tensor([1.0, 0.5])), "spatial_scale: got shape"),
    "float sampling_ratio": (lambda t, b: region_pool(t, b, (2, 3), 1.0, sampling_ratio=2.5), "sampling_ratio: got 2.5"),
    "float box_mask": (lambda t, b: region_pool(t, b, (2, 3), 1.0, torch.full((1, 2), 0.5)), "a mask, not weights"),
    "NaN spatial_scale": (lambda t, b: region_pool(t, b, (2, 3), float("nan")), "spatial_scale: got nan"),
    "inf spatial_scale": (lambda t, b: region_pool(t, b, (2, 3), float("inf")), "spatial_scale: got inf"),
    "zero spatial_scale": (lambda t, b: region_pool(t, b, (2, 3), 0), "spatial_scale: got 0"),
    "negative spatial_scale": (lambda t, b: region_pool(t, b, (2, 3), -0.5), "spatial_scale: got -0.5"),
    "sampling_ratio over the cap": (lambda t, b: region_pool(t, b, (2, 3), 1.0, sampling_ratio=46341),
                                    "sampling_ratio: got 46341, expected at most 32768"),
}


@pytest.mark.parametrize("call, message", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_a_wrong_argument_is_named_instead_of_failing_deep_inside_or_rounding(call, message):
    """These failed with a bare AttributeError / TypeError, or ran: integer tokens came back truncated to
    integers, a 2.5 sampling ratio ran as 2 and a 0.5 mask as True. A NaN, infinite, zero or negative
    spatial_scale (say 1 // 14 for 1 / 14) gave every box a silent zero row, and a fixed sampling_ratio over
    46340 overflowed the kernel's int32 point count (rows x cols): its rows came out ~1e9x too large (the torch
    path's were right; torchvision fails on such a ratio too)."""
    tokens, boxes = torch.randn(1, 6, 3), torch.tensor([[[0.0, 0.0, 2.0, 2.0], [1.0, 0.0, 3.0, 1.5]]])
    with pytest.raises(ValueError, match=message):
        call(tokens, boxes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_one_element_scale_of_any_shape_is_one_number(backend):
    """A [1, 1] spatial_scale broadcast the torch path's [N] coordinates to [1, N] and crashed; a float64 [1] one
    put its coordinates in float64 where the triton path's were not."""
    tokens = torch.randn(2, 35, 6)
    boxes = torch.tensor([[[0.3, 0.1, 20.3, 15.2], [1.0, 1.0, 9.0, 9.0]], [[2.0, 3.0, 12.0, 19.0], [5.0, 1.0, 9.0, 4.0]]])
    want = region_pool(tokens, boxes, (5, 7), 0.25, backend=backend)
    for scale in (torch.tensor([[0.25]]), torch.tensor([0.25], dtype=torch.float64)):
        torch.testing.assert_close(region_pool(tokens, boxes, (5, 7), scale, backend=backend), want, rtol=0, atol=0)
