import contextlib
import copy
import sys
import types

import open_clip
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import fineclip_ds.models.factory  # noqa: F401  (registers our model configs)
from fineclip_ds.models import attention
from fineclip_ds.models.attention import FLASH_ATTN_INSTALLED, Attention, use_attention_backend


def _pair(backend: str, seed: int = 0):
    torch.manual_seed(seed)
    reference = nn.MultiheadAttention(48, 4, batch_first=True).double()
    nn.init.normal_(reference.in_proj_bias)
    ours = Attention.replacing(copy.deepcopy(reference), backend)
    return reference, ours


@pytest.mark.parametrize("backend", ["sdpa", "math", "auto", "flash_attn"])
@pytest.mark.parametrize("causal", [None, "additive", "boolean"])
def test_matches_torch_multihead_attention_forward_and_backward(backend, causal):
    """Masks as nn.MultiheadAttention reads them: additive floats, or booleans with True = not attended."""
    reference, ours = _pair(backend)
    x = torch.randn(3, 11, 48, dtype=torch.float64, requires_grad=True)
    masks = {None: None, "additive": torch.full((11, 11), float("-inf"), dtype=torch.float64).triu(1),
             "boolean": torch.ones(11, 11, dtype=torch.bool).triu(1)}
    mask = masks[causal]
    expected = reference(x, x, x, need_weights=False, attn_mask=mask)[0]
    got = ours(x, attn_mask=mask)[0]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    grad = torch.randn_like(got)
    expected_grads = torch.autograd.grad(expected, [x, *reference.parameters()], grad)
    got_grads = torch.autograd.grad(got, [x, *ours.parameters()], grad)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)


def test_value_only_is_out_proj_of_value_projection():
    reference, ours = _pair("sdpa")
    x = torch.randn(2, 5, 48, dtype=torch.float64)
    value = x @ reference.in_proj_weight[96:].T + reference.in_proj_bias[96:]
    torch.testing.assert_close(ours(x, value_only=True)[0], reference.out_proj(value))


def test_sdpa_agrees_with_math_in_float32():
    _, sdpa = _pair("sdpa")
    math_backend = copy.deepcopy(sdpa)
    math_backend.backend = "math"
    x = torch.randn(2, 17, 48, dtype=torch.float64).float()
    torch.testing.assert_close(sdpa.float()(x)[0], math_backend.float()(x)[0], rtol=1e-5, atol=1e-6)


def test_open_clip_state_dict_names_are_unchanged():
    clip = open_clip.create_model("FineCLIP-ViT-T-8")
    before = {k: v.shape for k, v in clip.state_dict().items()}
    use_attention_backend(clip.visual.transformer, "sdpa")
    use_attention_backend(clip.transformer, "sdpa")
    assert {k: v.shape for k, v in clip.state_dict().items()} == before


def test_bad_backend_is_rejected():
    with pytest.raises(ValueError, match="model.attention"):
        Attention(8, 2, "xformers")


def test_key_and_value_may_alias_the_query_but_not_differ_from_it():
    # ZeRO-3's hooks hand open_clip's q_x, k_x, v_x over as distinct objects sharing memory
    _, ours = _pair("sdpa")
    x = torch.randn(2, 5, 48, dtype=torch.float64)
    torch.testing.assert_close(ours(x, x.detach(), x.view_as(x))[0], ours(x)[0])
    with pytest.raises(NotImplementedError, match="self-attention"):
        ours(x, x.clone(), x)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("width, heads", [(768, 12), (1664, 16)], ids=["ViT-B-head64", "ViT-bigG-head104"])
@pytest.mark.parametrize("backend", ["sdpa", "flash_attn"])
def test_gpu_bf16_kernels_match_float64_math_forward_and_backward(backend, width, heads):
    """The kernels training uses on a GPU: SDPA held to its flash kernel (it raises if that cannot serve
    the call, so a silent fallback to the math kernel would fail here) and the flash-attn package."""
    if backend == "flash_attn" and not FLASH_ATTN_INSTALLED:
        pytest.skip("flash-attn is not installed")
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(width, heads, batch_first=True)
    ours = Attention.replacing(copy.deepcopy(reference), backend).cuda().bfloat16()
    math64 = Attention.replacing(copy.deepcopy(reference), "math").cuda().double()
    x = torch.randn(4, 197, width, device="cuda")
    x_ours, x_want = x.bfloat16().requires_grad_(), x.double().requires_grad_()
    only_flash = sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if backend == "sdpa" else contextlib.nullcontext()
    with only_flash:
        got = ours(x_ours)[0]
    want = math64(x_want)[0]
    grad = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, [x_ours, ours.in_proj_weight], grad.bfloat16())
    want_grads = torch.autograd.grad(want, [x_want, math64.in_proj_weight], grad)
    # bf16 inputs, weights and outputs: the CPU's flash kernel, run the same way, is 5e-3 to 6e-3 off
    for got_tensor, want_tensor in zip((got, *got_grads), (want, *want_grads)):
        assert _relative_error(got_tensor, want_tensor) < 2e-2


def _open_clip_pair(backend: str) -> tuple[nn.Module, nn.Module]:
    """open_clip's CLIP (its own nn.MultiheadAttention blocks) and a copy whose towers run `backend`, in
    float64, every parameter perturbed so that zero-initialised biases (q/k/v slots) count too."""
    torch.manual_seed(0)
    reference = open_clip.create_model("FineCLIP-ViT-T-8").double()
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.05 * torch.randn_like(param))
    ours = copy.deepcopy(reference)
    use_attention_backend(ours.visual.transformer, backend)
    use_attention_backend(ours.transformer, backend)
    return reference, ours


def _assert_towers_match(reference: nn.Module, ours: nn.Module) -> None:
    """encode_image (no mask) and encode_text (open_clip's causal mask), forward and every gradient."""
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    tokens = open_clip.get_tokenizer("FineCLIP-ViT-T-8")(["a red circle", "two blue squares left of a cat"])
    image_weights, text_weights = torch.randn(2, 64, dtype=torch.float64), torch.randn(2, 64, dtype=torch.float64)
    results = []
    for model in (reference, ours):
        image, text = model.encode_image(images), model.encode_text(tokens)
        ((image * image_weights).sum() + (text * text_weights).sum()).backward()
        results.append((image, text, {name: p.grad for name, p in model.named_parameters()}))
    (want_image, want_text, want_grads), (got_image, got_text, got_grads) = results
    torch.testing.assert_close(got_image, want_image, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_text, want_text, rtol=1e-10, atol=1e-12)
    assert got_grads.keys() == want_grads.keys()
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("backend", ["sdpa", "math", "auto", "flash_attn"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_open_clip_towers_match_open_clips_own_blocks_forward_and_backward(backend, mode):
    """The text tower's causal mask and the unmasked image tower, against open_clip's modules themselves."""
    reference, ours = _open_clip_pair(backend)
    reference.train(mode == "train")
    ours.train(mode == "train")
    _assert_towers_match(reference, ours)


def _flash_attn_stand_in(calls: list[dict]) -> types.ModuleType:
    """A module named flash_attn whose packed-QKV function records what it is given and computes what
    flash-attn documents: qkv [B, S, 3, H, D] -> softmax(q k^T * softmax_scale (None: D^-0.5)) v, [B, S, H, D]."""

    def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                  softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        calls.append({"shape": tuple(qkv.shape), "dropout_p": dropout_p, "softmax_scale": softmax_scale,
                      "causal": causal, "contiguous": qkv.is_contiguous()})
        query, key, value = qkv.unbind(2)  # each [B, S, H, D]
        scale = query.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        scores = torch.einsum("bshd,bthd->bhst", query, key) * scale
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        return torch.einsum("bhst,bthd->bshd", scores.softmax(-1), value)

    module = types.ModuleType("flash_attn")
    module.flash_attn_qkvpacked_func = flash_attn_qkvpacked_func
    return module


@pytest.mark.parametrize("backend", ["flash_attn", "auto"])
def test_flash_attn_receives_packed_qkv_in_its_layout_without_dropout_or_causal_flag(monkeypatch, backend):
    """flash-attn is not installed here: a stand-in checks the call (the CUDA / half-precision gate aside).
    The image tower's calls go to it as [B, S, 3, H, D]; the text tower has a mask and must not."""
    calls: list[dict] = []
    monkeypatch.setitem(sys.modules, "flash_attn", _flash_attn_stand_in(calls))
    monkeypatch.setattr(attention, "_flash_attn_usable", lambda x, attn_mask: attn_mask is None)
    reference, ours = _open_clip_pair(backend)
    reference.train()
    ours.train()
    _assert_towers_match(reference, ours)
    tokens_per_image, heads, head_dim = 1 + 8 * 8, 2, 32  # FineCLIP-ViT-T-8: width 64, head_width 32
    assert calls == [{"shape": (2, tokens_per_image, 3, heads, head_dim), "dropout_p": 0.0, "softmax_scale": None,
                      "causal": False, "contiguous": True}] * len(ours.visual.transformer.resblocks)


def test_flash_attn_serves_only_cuda_half_precision_calls_without_a_mask(monkeypatch):
    monkeypatch.setattr(attention, "FLASH_ATTN_INSTALLED", True)
    x = torch.randn(1, 4, 8)
    assert not attention._flash_attn_usable(x.bfloat16(), None)  # CPU
    assert not attention._flash_attn_usable(x, None)
    if torch.cuda.is_available():
        assert attention._flash_attn_usable(x.cuda().bfloat16(), None)
        assert not attention._flash_attn_usable(x.cuda().float(), None)
        assert not attention._flash_attn_usable(x.cuda().bfloat16(), torch.zeros(4, 4, device="cuda"))


@pytest.mark.parametrize("backend", ["sdpa", "math", "auto", "flash_attn"])
@pytest.mark.parametrize("masks", ["causal_and_class_token", "key_padding"])
def test_open_clip_text_towers_with_per_sequence_masks_match_open_clip(backend, masks):
    """open_clip's class-token (CoCa) and key-padding text masks are [B * heads, N, N], as nn.MultiheadAttention
    takes them; SDPA and the math path broadcast [N, N] or [B, heads, N, N] and raised on these for B > 1."""
    torch.manual_seed(0)
    options = ({"embed_cls": True} if masks == "causal_and_class_token"
               else {"no_causal_mask": True, "use_pad_mask": True})
    reference = open_clip.transformer.TextTransformer(context_length=9, vocab_size=50, width=48, heads=4, layers=2,
                                                      output_dim=16, **options).double()
    ours = copy.deepcopy(reference)
    use_attention_backend(ours.transformer, backend)
    tokens = torch.tensor([[5, 7, 9, 2, 0, 0, 0, 0, 0], [5, 11, 13, 17, 19, 23, 2, 0, 0], [5, 2, 0, 0, 0, 0, 0, 0, 0]])
    weights = torch.randn(3, 16, dtype=torch.float64)
    results = []
    for model in (reference, ours):
        features = model(tokens)
        (features * weights).sum().backward()
        results.append((features, {name: p.grad for name, p in model.named_parameters()}))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("kind", ["additive", "boolean"])
def test_per_sequence_masks_match_torch_multihead_attention(backend, kind):
    """[B * heads, N, N], batch-major: each sequence and head its own mask, as nn.MultiheadAttention reads it."""
    reference, ours = _pair(backend)
    x = torch.randn(3, 7, 48, dtype=torch.float64, requires_grad=True)
    hidden = torch.rand(3 * 4, 7, 7) < 0.3
    hidden[..., 0] = False  # every query attends to something
    additive = torch.zeros(3 * 4, 7, 7, dtype=torch.float64).masked_fill(hidden, float("-inf"))
    mask = hidden if kind == "boolean" else additive
    expected = reference(x, x, x, need_weights=False, attn_mask=mask)[0]
    got = ours(x, attn_mask=mask)[0]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    grad = torch.randn_like(got)
    for g, e in zip(torch.autograd.grad(got, [x, ours.in_proj_weight], grad),
                    torch.autograd.grad(expected, [x, reference.in_proj_weight], grad)):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)
