import json
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from fineclip_ds.config import ModelConfig
from fineclip_ds.models.factory import create_fineclip
from fineclip_ds.models.regions import crop_regions, enlarge_boxes, pool_regions


def _model(**overrides):
    torch.manual_seed(0)
    model, tokenizer, _ = create_fineclip(ModelConfig(**overrides))
    return model.eval(), tokenizer


def test_global_head_equals_open_clip_encode_image():
    model, _ = _model()
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model.encode_image(images), F.normalize(model.clip.encode_image(images), dim=-1))


def test_dense_path_is_value_only_last_block():
    """Written out by hand: x + out_proj(v(ln_1 x)), then the MLP, then ln_post and proj per token."""
    model, _ = _model()
    images = torch.randn(2, 3, 64, 64)
    dense, grid_hw = model.encode_dense(images)
    block, visual = model.visual.transformer.resblocks[-1], model.visual
    x, _ = model._trunk(images)
    width = x.shape[-1]
    value = F.linear(block.ln_1(x), block.attn.in_proj_weight[2 * width:], block.attn.in_proj_bias[2 * width:])
    x = x + block.attn.out_proj(value)
    x = x + block.mlp(block.ln_2(x))
    expected = F.normalize(visual.ln_post(x[:, 1:]) @ visual.proj, dim=-1)
    assert grid_hw == (8, 8)
    torch.testing.assert_close(dense, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("images", [torch.randn(1, 3, 96, 96), torch.randn(3, 64, 64),
                                    torch.zeros(1, 3, 64, 64, dtype=torch.uint8), torch.randn(1, 1, 64, 64)],
                         ids=["other_size", "no_batch", "uint8", "grey"])
def test_images_the_model_cannot_take_are_named_with_the_size_it_takes(images):
    """These failed inside the tower with bare shape or dtype errors."""
    model, _ = _model()
    with pytest.raises(ValueError, match=r"images: got shape .* expected \[B, 3, 64, 64\] normalised floats"):
        model.encode_image(images)
    with pytest.raises(ValueError, match="RegionTransform"):
        model.encode_dense(images)


def test_the_dense_map_alone_runs_the_last_block_once_value_only():
    """encode_dense (box classification, segmentation, dense pictures) ran the global last block too."""
    model, _ = _model()
    images = torch.randn(2, 3, 64, 64)
    _, both_dense, both_grid = model.encode_image_and_dense(images)
    last_block, run_block, full_last_blocks = model.tower.blocks[-1], model.tower.run_block, []

    def counted_run_block(block, x, context):
        full_last_blocks.extend([block] if block is last_block else [])
        return run_block(block, x, context)

    model.tower.run_block = counted_run_block
    dense, grid_hw = model.encode_dense(images)
    assert full_last_blocks == [] and grid_hw == both_grid
    torch.testing.assert_close(dense, both_dense, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])  # triton: the fused kernel, interpreted on CPU
def test_region_features_are_roi_align_of_the_dense_map_normalised_and_masked(backend):
    model, _ = _model()
    dense, grid_hw = model.encode_dense(torch.randn(2, 3, 64, 64))
    boxes = torch.tensor([[[0.0, 0.0, 64.0, 64.0], [3.5, 9.0, 20.0, 17.5]], [[30.0, 1.0, 33.0, 60.0], [0, 0, 0, 0]]])
    mask = torch.tensor([[True, True], [True, False]])
    regions = model.region_features(dense, grid_hw, boxes, mask, backend=backend)
    fmap = dense.transpose(1, 2).reshape(2, -1, *grid_hw)
    expected = roi_align(fmap, list(boxes), output_size=1, spatial_scale=1 / 8, sampling_ratio=-1, aligned=True).flatten(1)
    torch.testing.assert_close(regions[mask], F.normalize(expected, dim=-1)[mask.flatten()])
    assert regions[1, 1].abs().max() == 0


def test_logit_scale_is_a_vector_clamped_at_100():
    model, _ = _model()
    assert model.clip.logit_scale.shape == (1,)
    with torch.no_grad():
        model.clip.logit_scale.fill_(10.0)
    torch.testing.assert_close(model.logit_scale(), torch.tensor([100.0]))


@pytest.mark.parametrize("stored", [math.log(100.0), 4.60546875, 4.7], ids=["fp32-ln100", "fp16-ln100", "above"])
def test_a_temperature_at_or_above_the_cap_still_learns_downward(stored):
    """Pretrained CLIPs store fp32(ln 100) or OpenAI's fp16 value, both above ln 100 in float64."""
    model, _ = _model()
    with torch.no_grad():
        model.clip.logit_scale.fill_(stored)
    scale = model.logit_scale()
    torch.testing.assert_close(scale, torch.tensor([100.0]))
    scale.sum().backward()  # a loss that grows with the scale: gradient descent must lower t
    assert model.clip.logit_scale.grad.item() > 0


@pytest.mark.parametrize("stored,gradient_blocked", [(4.7, True), (math.log(100.0), True), (4.0, False)])
def test_the_cap_blocks_only_gradients_that_would_raise_the_temperature_past_it(stored, gradient_blocked):
    model, _ = _model()
    with torch.no_grad():
        model.clip.logit_scale.fill_(stored)
    (-model.logit_scale()).sum().backward()  # a loss that wants a larger scale
    assert (model.clip.logit_scale.grad.item() == 0) == gradient_blocked


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_boxes_pool_at_each_axis_own_scale_with_non_square_patches(tmp_path, backend):
    config = {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32,
                                              "patch_size": [8, 16]},
              "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    (tmp_path / "Test-ViT-NonSquarePatch.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path)
    model, _ = _model(name="Test-ViT-NonSquarePatch")
    with torch.no_grad():
        dense, grid_hw = model.encode_dense(torch.randn(1, 3, 64, 64))
        boxes = torch.tensor([[[40.0, 8.0, 64.0, 24.0], [3.0, 30.0, 35.0, 61.0]]])
        got = model.region_features(dense, grid_hw, boxes, backend=backend)
    feature_map = dense.transpose(1, 2).reshape(1, -1, *grid_hw)
    in_grid_units = boxes[0] * torch.tensor([1 / 16, 1 / 8, 1 / 16, 1 / 8])  # x by the patch width, y by its height
    expected = F.normalize(roi_align(feature_map, [in_grid_units], 1, 1.0, -1, True).flatten(1), dim=-1)
    assert grid_hw == (8, 4)
    torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patch_aligned_boxes_take_the_float64_sample_count_with_non_square_patches(tmp_path, backend):
    """x was scaled by patch_h / patch_w in the boxes' fp32 and then by 1 / patch_h: with 16 x 14 patches, 14 * k px
    landed a hair above k cells (1211 of 2360 patch-aligned spans), so adaptive sampling took one sample more
    across and blended in the next column of patches. Each axis in grid units in fp64 (x / patch_w, y / patch_h)
    is exact for them, as the square-patch path is at 1/14."""
    config = {"embed_dim": 64, "vision_cfg": {"image_size": [64, 112], "layers": 2, "width": 64, "head_width": 32,
                                              "patch_size": [16, 14]},
              "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    (tmp_path / "Test-ViT-Patch16x14.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path)
    model, _ = _model(name="Test-ViT-Patch16x14")
    grid_hw = (4, 8)
    dense = F.normalize(torch.randn(1, 32, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    # one patch column, two, three and the whole width: x spans of 14 * k px starting on patch edges
    boxes = torch.tensor([[[14.0, 0.0, 28.0, 64.0], [28.0, 16.0, 56.0, 48.0], [42.0, 0.0, 84.0, 32.0],
                           [0.0, 0.0, 112.0, 64.0]]])
    got = model.region_features(dense, grid_hw, boxes, backend=backend)
    feature_map = dense.double().transpose(1, 2).reshape(1, -1, *grid_hw)
    in_grid_units = boxes[0].double() / torch.tensor([14.0, 16.0, 14.0, 16.0], dtype=torch.float64)
    expected = F.normalize(roi_align(feature_map, [in_grid_units], 1, 1.0, -1, True).flatten(1), dim=-1)
    torch.testing.assert_close(got[0].double(), expected, rtol=1e-5, atol=1e-5)


def test_text_tower_frozen_by_default_and_trainable_on_request():
    frozen, _ = _model()
    trainable, _ = _model(freeze_text=False)
    assert not any(p.requires_grad for p in frozen.text_parameters())
    assert all(p.requires_grad for p in trainable.text_parameters())
    assert all(p.requires_grad for p in frozen.visual.parameters()) and frozen.clip.logit_scale.requires_grad



@pytest.mark.parametrize("name", ["FineCLIP-ViT-T-8", "FineCLIP-EVA02-T-14"])
def test_a_frozen_text_tower_stays_in_eval_mode_so_its_embeddings_are_deterministic(name):
    """FineCLIP's CustomCLIP.train keeps its frozen text tower in eval mode. A dropout is planted in the
    tower (HF text towers have one): in training mode the frozen embeddings must not change from call to call."""
    tokens = open_clip.get_tokenizer(name)(["a red circle", "a blue square"])
    for freeze_text, deterministic in ((True, True), (False, False)):
        model, _ = _model(name=name, freeze_text=freeze_text)
        text = model.text_modules()[-1]
        text.register_forward_hook(lambda module, args, output: torch.nn.functional.dropout(output, 0.5, module.training))
        model.train()
        assert model.visual.training
        assert all(not m.training for m in model.text_modules()) == deterministic
        assert torch.equal(model.encode_text(tokens), model.encode_text(tokens)) == deterministic

def test_crops_are_enlarged_boxes_resized_to_the_input_size():
    images = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    boxes = torch.tensor([[[4.0, 4.0, 8.0, 8.0]], [[0.0, 0.0, 16.0, 16.0]]])
    mask = torch.ones(2, 1, dtype=torch.bool)
    torch.testing.assert_close(enlarge_boxes(boxes, 1.5, (16, 16)), torch.tensor([[[3.0, 3.0, 9.0, 9.0]], [[0.0, 0.0, 16.0, 16.0]]]))
    crops = crop_regions(images, boxes, mask, 1.5, (16, 16))
    assert crops.shape == (2, 3, 16, 16)
    torch.testing.assert_close(crops[1], images[1])  # the whole image, at its own size, is itself


def test_bf16_images_are_cropped_like_fp32_ones():
    """DeepSpeed bf16 training hands the objective bf16 images; torchvision's roi_align has no bf16
    kernel on CPU or CUDA, so this crashed every bf16 GPU step before crops were taken in fp32."""
    images = torch.rand(2, 3, 32, 32).bfloat16()
    boxes = torch.tensor([[[1.0, 2.0, 20.0, 30.0], [5.0, 5.0, 9.0, 9.0]], [[0.0, 0.0, 32.0, 32.0], [0.0, 0.0, 1.0, 1.0]]])
    mask = torch.tensor([[True, True], [True, False]])
    crops = crop_regions(images, boxes.bfloat16(), mask, 1.5, (16, 16))
    assert crops.dtype == torch.bfloat16 and crops.shape == (3, 3, 16, 16)
    expected = crop_regions(images.float(), boxes.bfloat16().float(), mask, 1.5, (16, 16))
    torch.testing.assert_close(crops.float(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_bf16_token_maps_are_pooled_at_the_exact_fp32_box_coordinates(backend):
    """Boxes used to be cast to the map's dtype: in bf16, 501 px became 500 or 502 (1/8 of a token here)."""
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(2, 80 * 80, 24, generator=generator).bfloat16()
    corners = 300 + 300 * torch.rand(2, 6, 2, generator=generator)
    boxes = torch.cat([corners, corners + 4 + 12 * torch.rand(2, 6, 2, generator=generator)], dim=-1)
    got = pool_regions(dense, boxes, (80, 80), 1 / 8, backend=backend)
    want = pool_regions(dense.double(), boxes.double(), (80, 80), 1 / 8, backend="torch")
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)


def test_activation_checkpointing_leaves_gradients_unchanged():
    boxes = torch.tensor([[[2.0, 3.0, 40.0, 30.0], [10.0, 10.0, 60.0, 60.0]]]).repeat(2, 1, 1).double()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)

    def gradients(**checkpointing):
        model, _ = _model(**checkpointing)
        model = model.double().train()
        global_embedding, dense, grid_hw = model.encode_image_and_dense(images)
        regions = model.region_features(dense, grid_hw, boxes)
        (global_embedding.square().sum() + regions.sin().sum()).backward()
        return {name: p.grad for name, p in model.visual.named_parameters() if p.grad is not None}

    reference = gradients()
    for every in (1, 2):
        recomputed = gradients(grad_checkpointing=True, checkpoint_every=every)
        assert recomputed.keys() == reference.keys()
        for name in reference:
            torch.testing.assert_close(recomputed[name], reference[name], rtol=1e-10, atol=1e-12, msg=name)


def _dense_by_hand(model, images: torch.Tensor) -> torch.Tensor:
    """The dense map as the module docstring defines it, from open_clip's modules: the trunk, then the last block
    with attention reduced to out_proj(v), ln_post and proj per patch token, L2-normalised."""
    visual = model.visual
    block = visual.transformer.resblocks[-1]
    x = visual._embeds(images)
    for earlier in visual.transformer.resblocks[:-1]:
        x = earlier(x)
    width = x.shape[-1]
    value = F.linear(block.ln_1(x), block.attn.in_proj_weight[2 * width:], block.attn.in_proj_bias[2 * width:])
    x = x + block.ls_1(block.attn.out_proj(value))
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return F.normalize(visual.ln_post(x[:, 1:]) @ visual.proj, dim=-1)


def _dense_outputs_and_gradients(model, images: torch.Tensor, by_hand: bool = False):
    dense = _dense_by_hand(model, images) if by_hand else model.encode_dense(images)[0]
    weights = torch.randn(dense.shape, dtype=dense.dtype, generator=torch.Generator().manual_seed(1))
    (dense * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.visual.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return dense.detach(), grads


@pytest.mark.parametrize("size", [64, [48, 80]], ids=["square", "non_square"])
def test_dense_map_with_and_without_checkpointing_is_the_hand_written_one_forward_and_backward(size):
    """Every patch of an h x w grid (6 x 10 for 48 x 80), row-major; checkpointed blocks give the same map and
    gradients as the plain path and as the definition written out."""
    model, _ = _model(image_size=size)
    model = model.double().train()
    with torch.no_grad():  # layer scale and biases away from their initial values, so that each one counts
        for param in model.visual.parameters():
            param.add_(0.05 * torch.randn_like(param))
    height, width = (size, size) if isinstance(size, int) else size
    images = torch.randn(2, 3, height, width, dtype=torch.float64)
    assert model.encode_dense(images)[1] == (height // 8, width // 8)
    want, want_grads = _dense_outputs_and_gradients(model, images, by_hand=True)
    assert want.shape == (2, (height // 8) * (width // 8), 64)
    for every in (None, 1, 2):
        model.grad_checkpointing, model.checkpoint_every = every is not None, every or 1
        got, got_grads = _dense_outputs_and_gradients(model, images)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert got_grads.keys() == want_grads.keys()
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-9, atol=1e-11, msg=name)


def _with_dropout_in_every_block(model, p: float = 0.3):
    """open_clip's ViT has no dropout; one after each branch (in place of its identity layer scales) makes the
    blocks draw from the RNG, which a checkpointed block must replay identically in backward."""
    for block in model.visual.transformer.resblocks:
        block.ls_1, block.ls_2 = torch.nn.Dropout(p), torch.nn.Dropout(p)
    return model


def test_checkpointing_recomputes_blocks_and_replays_their_dropout_masks():
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    boxes = torch.tensor([[[2.0, 3.0, 40.0, 30.0], [10.0, 10.0, 60.0, 60.0]]], dtype=torch.float64).repeat(2, 1, 1)

    def loss_gradients_and_block_calls(**checkpointing):
        model, _ = _model(**checkpointing)
        model = _with_dropout_in_every_block(model.double().train())
        calls = []
        for block in model.visual.transformer.resblocks:
            block.mlp.register_forward_hook(lambda *_: calls.append(1))
        torch.manual_seed(7)
        global_embedding, dense, grid_hw = model.encode_image_and_dense(images)
        loss = global_embedding.square().sum() + model.region_features(dense, grid_hw, boxes).sin().sum()
        loss.backward()
        grads = {name: p.grad for name, p in model.visual.named_parameters() if p.grad is not None}
        return loss.detach(), grads, len(calls)

    want_loss, want_grads, plain_calls = loss_gradients_and_block_calls()
    for every, recomputed_calls in ((1, 4), (2, 3)):  # 3 blocks, the last twice: indices 0, 1, 2, 2 / 0, 2, 2
        loss, grads, calls = loss_gradients_and_block_calls(grad_checkpointing=True, checkpoint_every=every)
        assert calls == plain_calls + recomputed_calls
        torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=0)
        assert grads.keys() == want_grads.keys()
        for name, grad in want_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)
