"""Training and evaluating at a size other than the checkpoint's: positional embeddings interpolated once."""
import pytest
import open_clip
import torch
import torch.nn.functional as F

from fineclip_ds.config import ModelConfig
from fineclip_ds.models.factory import create_fineclip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(open_clip.create_model("FineCLIP-ViT-T-8").state_dict(), path)
    return str(path)


def _model(checkpoint: str, size=None):
    model, _, _ = create_fineclip(ModelConfig(pretrained=checkpoint, image_size=size))
    return model.eval()


def test_native_size_is_the_identity(checkpoint):
    native, same = _model(checkpoint), _model(checkpoint, 64)
    torch.testing.assert_close(same.visual.positional_embedding, native.visual.positional_embedding, rtol=0, atol=0)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(same.encode_image(images), native.encode_image(images), rtol=0, atol=0)


@pytest.mark.parametrize("size", [72, [64, 96]])
def test_a_small_change_of_size_keeps_features_finite_and_close(checkpoint, size):
    native, resized = _model(checkpoint), _model(checkpoint, size)
    height, width = (size, size) if isinstance(size, int) else size
    assert resized.image_size == (height, width)
    assert resized.visual.positional_embedding.shape[0] == (height // 8) * (width // 8) + 1
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        before = native.encode_image(images)
        after = resized.encode_image(F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False))
        dense, grid_hw = resized.encode_dense(torch.randn(1, 3, height, width))
    assert torch.isfinite(after).all() and grid_hw == (height // 8, width // 8)
    assert dense.shape == (1, grid_hw[0] * grid_hw[1], 64)
    assert (before * after).sum(-1).min() > 0.95  # cosine similarity of unit embeddings


def test_a_grid_of_the_same_length_but_another_shape_is_resampled_not_reread(checkpoint):
    """8 x 8 -> 4 x 16 has 64 tokens either way: open_clip alone would keep the 8 x 8 table as is."""
    native, wide = _model(checkpoint), _model(checkpoint, [32, 128])
    table = native.visual.positional_embedding.detach()
    image_part = table[1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(image_part, size=(4, 16), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(wide.visual.positional_embedding[1:], expected.permute(0, 2, 3, 1).reshape(64, -1))
    torch.testing.assert_close(wide.visual.positional_embedding[0], table[0], rtol=0, atol=0)


def test_training_step_at_a_non_square_size_runs_and_saves_at_that_size(checkpoint, tmp_path):
    model = _model(checkpoint, [48, 80]).train()
    images = torch.randn(2, 3, 48, 80)
    global_embedding, dense, grid_hw = model.encode_image_and_dense(images)
    regions = model.region_features(dense, grid_hw, torch.tensor([[[4.0, 4.0, 70.0, 40.0]]]).repeat(2, 1, 1))
    (global_embedding.sum() + regions.sum()).backward()
    assert model.visual.positional_embedding.grad is not None
    torch.save(model.clip.state_dict(), tmp_path / "resized.pt")
    reloaded, _, _ = create_fineclip(ModelConfig(pretrained=str(tmp_path / "resized.pt"), image_size=[48, 80]))
    torch.testing.assert_close(reloaded.visual.positional_embedding, model.visual.positional_embedding)


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    """A model config trained at [32, 128] (a 4 x 16 grid), as export writes for a run trained at that size."""
    import copy
    import json

    folder = tmp_path_factory.mktemp("wide")
    model_config = copy.deepcopy(open_clip.get_model_config("FineCLIP-ViT-T-8"))
    model_config["vision_cfg"]["image_size"] = [32, 128]
    (folder / "wide-T-8.json").write_text(json.dumps(model_config))
    open_clip.add_model_config(folder / "wide-T-8.json")
    torch.manual_seed(0)
    clip = open_clip.create_model("wide-T-8")
    torch.save(clip.state_dict(), folder / "wide.pt")
    return str(folder / "wide.pt"), clip.visual.positional_embedding.detach()


@pytest.mark.parametrize("size,grid", [(96, (12, 12)), ([48, 80], (6, 10)), (64, (8, 8))])
def test_a_non_square_checkpoint_grid_is_resampled_from_its_own_shape(wide_checkpoint, size, grid):
    """open_clip reads a 65-row table as 8 x 8 whatever its config's grid: 96 px and 64 px came out scrambled
    and [48, 80] too, each without a word."""
    path, table = wide_checkpoint
    model, _, _ = create_fineclip(ModelConfig(name="wide-T-8", pretrained=path, image_size=size))
    image_part = table[1:].reshape(1, 4, 16, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(image_part, size=grid, mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(model.visual.positional_embedding[1:],
                               expected.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1))
    torch.testing.assert_close(model.visual.positional_embedding[0], table[0], rtol=0, atol=0)
    reference = open_clip.create_model("wide-T-8", pretrained=path)
    for name, value in reference.state_dict().items():  # every other weight is the checkpoint's
        if name != "visual.positional_embedding":
            torch.testing.assert_close(model.clip.state_dict()[name].reshape(value.shape), value, rtol=0, atol=0)

