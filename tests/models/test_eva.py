"""EVA02-CLIP (timm Eva inside open_clip) through the same dense path, from a local checkpoint."""
import open_clip
import pytest
import torch
import torch.nn.functional as F

from fineclip_ds.config import KernelConfig, LossConfig, ModelConfig
from fineclip_ds.losses.objective import FineCLIPObjective
from fineclip_ds.models.factory import create_fineclip
from tests.training import eva_layer_scale

NAME = "FineCLIP-EVA02-T-14"  # timm eva02_tiny_patch14_224 + a tiny text tower, built offline


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("eva") / "eva.pt"
    torch.save(open_clip.create_model(NAME).state_dict(), path)
    return path


def _model(checkpoint, **overrides):
    model, tokenizer, _ = create_fineclip(ModelConfig(name=NAME, pretrained=str(checkpoint), **overrides))
    return model, tokenizer


def test_loads_the_local_checkpoint_and_the_global_head_is_open_clips(checkpoint):
    model, _ = _model(checkpoint)
    reference = open_clip.create_model(NAME, pretrained=str(checkpoint)).eval()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.clip.state_dict()[name].reshape(value.shape), value, rtol=0, atol=0)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_image(images), reference.encode_image(images, normalize=True),
                                   rtol=1e-5, atol=1e-5)


def _assert_dense_path_is_the_last_block_attending_only_to_itself(model):
    model.eval()
    trunk = model.visual.trunk
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        dense, grid_hw = model.encode_dense(images)
        x, rope = model._trunk(images)
        self_only = torch.eye(x.shape[1], dtype=torch.bool)  # timm's own attention, restricted to the diagonal
        x = trunk.blocks[-1](x, rope=rope, attn_mask=self_only)
        tokens = trunk.norm(x)[:, 1:]
        expected = F.normalize(model.visual.head(trunk.head(trunk.fc_norm(tokens))), dim=-1)
    assert grid_hw == (16, 16) and dense.shape == (1, 256, 64)
    torch.testing.assert_close(dense, expected, rtol=1e-4, atol=1e-5)


def test_dense_path_is_the_last_block_attending_only_to_itself(checkpoint):
    _assert_dense_path_is_the_last_block_attending_only_to_itself(_model(checkpoint)[0])


def test_dense_path_applies_the_last_blocks_layer_scale():
    """timm Eva with init_values (no shipped config has it): gamma_1 scales attention, gamma_2 the MLP."""
    torch.manual_seed(0)
    model, _, _ = create_fineclip(ModelConfig(name=eva_layer_scale.NAME))
    last = model.visual.trunk.blocks[-1]
    with torch.no_grad():  # distinct per channel and per branch, so a swapped or missing gamma shows
        last.gamma_1.uniform_(0.2, 2.0)
        last.gamma_2.uniform_(0.2, 2.0)
    _assert_dense_path_is_the_last_block_attending_only_to_itself(model)


def test_a_training_step_runs_with_checkpointing(checkpoint):
    torch.manual_seed(0)
    model, tokenizer = _model(checkpoint, grad_checkpointing=True, freeze_text=True)
    objective = FineCLIPObjective(model.train(), LossConfig(), KernelConfig(region_pool="torch"))
    batch = {
        "images": torch.randn(2, 3, 224, 224),
        "texts": tokenizer(["a red circle", "a blue square"]),
        "boxes": torch.tensor([[[10.0, 20.0, 120.0, 200.0]], [[0.0, 0.0, 224.0, 224.0]]]),
        "box_mask": torch.tensor([[True], [True]]),
        "region_texts": tokenizer(["a red circle", "a blue square"]).view(2, 1, -1),
    }
    total, terms = objective(batch)
    total.backward()
    assert torch.isfinite(total) and set(terms) == {"gc", "sd", "rc", "logit_scale"}
    trunk = model.visual.trunk
    assert trunk.blocks[0].attn.qkv.weight.grad is not None and trunk.pos_embed.grad is not None
    assert all(p.grad is None for p in model.text_parameters())


def test_checkpointing_leaves_eva_dense_and_global_outputs_and_gradients_unchanged(checkpoint):
    images = torch.randn(1, 3, 224, 224, dtype=torch.float64)

    def outputs_and_gradients(**checkpointing):
        model, _ = _model(checkpoint, **checkpointing)
        model = model.double().train()
        global_embedding, dense, _ = model.encode_image_and_dense(images)
        weights = torch.randn(dense.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        ((dense * weights).sum() + global_embedding.square().sum()).backward()
        grads = {name: p.grad for name, p in model.visual.named_parameters() if p.grad is not None}
        return global_embedding.detach(), dense.detach(), grads

    want_global, want_dense, want_grads = outputs_and_gradients()
    got_global, got_dense, got_grads = outputs_and_gradients(grad_checkpointing=True, checkpoint_every=2)
    torch.testing.assert_close(got_global, want_global, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_dense, want_dense, rtol=1e-10, atol=1e-12)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-9, atol=1e-11, msg=name)
