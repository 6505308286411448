"""Loading checkpoints through the factory: OpenAI's own TorchScript files."""
import copy
import json
import re

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fineclip_ds.config import ConfigError, ModelConfig
from fineclip_ds.models.factory import create_fineclip

QUICK_GELU_NAME = "FineCLIP-ViT-T-8-quickgelu-test"


def _save_as_openai_archive(clip: nn.Module, path) -> None:
    """Write `clip`'s weights as OpenAI distributes CLIP: a TorchScript archive of fp16 weights under
    open_clip's names, a scalar logit scale, and an input_resolution attribute."""
    class Root(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Root()
    for key, value in clip.state_dict().items():
        *parents, leaf = key.split(".")
        module = root
        for parent in parents:
            if not hasattr(module, parent):
                module.add_module(parent, nn.Module())
            module = getattr(module, parent)
        value = value.reshape(()) if key == "logit_scale" else value
        module.register_parameter(leaf, nn.Parameter(value.half(), requires_grad=False))
    root.register_buffer("input_resolution", torch.tensor(64))
    torch.jit.script(root).save(str(path))


@pytest.fixture(scope="module")
def openai_archive(tmp_path_factory):
    folder = tmp_path_factory.mktemp("openai")
    model_config = copy.deepcopy(open_clip.get_model_config("FineCLIP-ViT-T-8"))
    model_config["quick_gelu"] = True
    (folder / f"{QUICK_GELU_NAME}.json").write_text(json.dumps(model_config))
    open_clip.add_model_config(folder / f"{QUICK_GELU_NAME}.json")
    torch.manual_seed(0)
    clip = open_clip.create_model(QUICK_GELU_NAME, nonscalar_logit_scale=True)
    _save_as_openai_archive(clip, folder / "ViT-T-8.pt")
    with torch.no_grad():  # the reference holds the archive's fp16-rounded weights
        for value in clip.state_dict().values():
            value.copy_(value.half().float())
    return str(folder / "ViT-T-8.pt"), clip.eval()


def test_an_openai_archive_loads_its_weights_with_quick_gelu(openai_archive):
    """open_clip's file loading refused it (torch.load weights_only=True cannot read TorchScript), although
    the docstring and the recipes offer OpenAI files."""
    path, reference = openai_archive
    model, _, _ = create_fineclip(ModelConfig(name=QUICK_GELU_NAME, pretrained=path))
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.clip.state_dict()[name], value, rtol=0, atol=0)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_image(images), reference.encode_image(images, normalize=True),
                                   rtol=1e-5, atol=1e-5)


def test_an_openai_archive_at_another_size_has_its_positional_table_resampled(openai_archive):
    path, reference = openai_archive
    model, _, _ = create_fineclip(ModelConfig(name=QUICK_GELU_NAME, pretrained=path, image_size=[48, 80]))
    table = reference.visual.positional_embedding.detach()
    expected = F.interpolate(table[1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2), size=(6, 10), mode="bicubic",
                             antialias=True, align_corners=False)
    torch.testing.assert_close(model.visual.positional_embedding[1:], expected.permute(0, 2, 3, 1).reshape(60, -1))


def test_an_openai_archive_into_a_gelu_model_is_refused_naming_the_quick_gelu_config(openai_archive):
    """With GELU the weights load without error and every feature differs."""
    path, _ = openai_archive
    with pytest.raises(ConfigError, match=re.escape("model.name: got 'FineCLIP-ViT-T-8', which uses GELU, but "
                                                    f"model.pretrained {path} is an OpenAI checkpoint, trained with "
                                                    "QuickGELU")):
        create_fineclip(ModelConfig(pretrained=path))
    with pytest.raises(ConfigError, match=re.escape("expected 'ViT-B-16-quickgelu'")):
        create_fineclip(ModelConfig(name="ViT-B-16", pretrained=path), device="meta")


FROZEN_RANDOM_TEXT = "the text tower stays at its random initialisation"


@pytest.mark.parametrize("settings,load_pretrained,announce,warned", [
    ({}, True, True, True),  # the big recipes' model.pretrained: null with freeze_text: true
    ({}, False, True, True),  # a dry run's plan of such a run
    ({"pretrained": "ViT-B-16.pt"}, False, True, False),  # a plan of a run that loads weights
    ({"freeze_text": False}, True, True, False),  # the text tower trains from its random init (tiny-cpu)
    ({}, True, False, False),  # ranks other than 0 build the same model
])
def test_a_frozen_text_tower_left_random_is_warned_about(caplog, settings, load_pretrained, announce, warned):
    with caplog.at_level("WARNING", logger="fineclip_ds"):
        create_fineclip(ModelConfig(**settings), device="meta", load_pretrained=load_pretrained, announce=announce)
    messages = [record.getMessage() for record in caplog.records if record.name == "fineclip_ds"]
    assert any(FROZEN_RANDOM_TEXT in message for message in messages) == warned, messages
    if warned:
        assert messages == [f"model.freeze_text is true but model.pretrained is not set: {FROZEN_RANDOM_TEXT}, so "
                            "every caption is encoded by random weights; set model.pretrained=<open_clip checkpoint "
                            "file> (e.g. --set model.pretrained=/path/to/ViT-B-16.pt), or model.freeze_text=false to "
                            "train the text tower"]


@pytest.mark.parametrize("base", ["FineCLIP-ViT-T-8", "FineCLIP-EVA02-T-14"])
def test_a_model_config_that_drops_patches_is_a_config_error(tmp_path, base):
    """Patch dropout leaves a dense map short of the patch grid in training: region pooling failed on its shape."""
    model_config = copy.deepcopy(open_clip.get_model_config(base))
    model_config["vision_cfg"]["patch_dropout"] = 0.5
    name = f"{base}-patch-dropout"
    (tmp_path / f"{name}.json").write_text(json.dumps(model_config))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    with pytest.raises(ConfigError, match="vision_cfg patch_dropout > 0, which drops patch tokens in training"):
        create_fineclip(ModelConfig(name=name))


def test_a_checkpoint_of_another_architecture_is_named_in_a_short_message(tmp_path):
    """torch's second line lists every missing and unexpected key: for a ViT-B file loaded as another model the
    config error ran to ~20 KB. The message keeps torch's first words and is cut, saying so."""
    torch.save({f"text.layers.{index}.weight": torch.zeros(1) for index in range(2000)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError) as error:
        create_fineclip(ModelConfig(name="FineCLIP-ViT-T-8", pretrained=str(tmp_path / "other.pt")))
    message = str(error.value)
    assert "does not load into model.name 'FineCLIP-ViT-T-8'" in message and "Missing key(s)" in message
    assert len(message) < 1000 and message.endswith(" ...")
