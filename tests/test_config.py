import re

import pytest

from fineclip_ds.config import RECIPE_DIR, ConfigError, load_config


def test_recipe_then_overrides_take_precedence():
    config = load_config("tiny-cpu", ["train.max_steps=7", "losses.w_sd=0", "optim.lr=2"])
    assert config.train.max_steps == 7 and config.losses.w_sd == 0.0 and config.optim.lr == 2.0
    assert config.model.name == "FineCLIP-ViT-T-8"


def test_exponent_floats_without_a_dot_are_floats():
    # YAML 1.1 reads `1e-4` as a string; a learning rate written that way must still work
    assert load_config("tiny-cpu", ["optim.lr=1e-4"]).optim.lr == 1e-4


@pytest.mark.parametrize("override,message", [
    ("train.max_stepz=3", "unknown config key 'train.max_stepz'"),
    ("model.colour=red", "unknown config key 'model.colour'"),
    ("optim.lr=fast", "optim.lr: 'fast' is a str, expected float"),
    ("train.max_steps=0", "train.max_steps: got 0, expected an integer >= 1"),
    ("kernels.region_pool=cuda", "kernels.region_pool: got 'cuda', expected one of"),
    ("data.source=laion", "data.source: got 'laion'"),
    ("data.source=webdataset", "data.train_shards"),
    ("losses.w_gc=-1", "losses.w_gc: got -1.0"),
    ("optim.lr=.inf", "optim.lr: got inf, expected a finite learning rate > 0"),
    ("optim.beta2=1.5", "optim.beta2: got 1.5, expected a value in [0, 1)"),
    ("optim.eps=-1", "optim.eps: got -1.0"),
    ("train.seed=-1", "train.seed: got -1"),
    ("losses.crop_source_scale=0", "losses.crop_source_scale: got 0, expected an integer in 1..8"),
    ("model.image_size=[72]", "model.image_size: got [72], expected null, an integer >= 16, or [height, width]"),
    ("train.resume=/no/such/dir", "train.resume"),
    ("model.pretrained=/no/such/file.pt", "model.pretrained"),
    ("nonsense", "must look like section.key=value"),
])
def test_bad_values_are_rejected_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("tiny-cpu", [override])


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ConfigError, match="tiny-cpu"):
        load_config("no-such-recipe")


def test_all_built_in_recipes_load():
    recipes = sorted(path.stem for path in RECIPE_DIR.glob("*.yaml"))
    assert {"tiny-cpu", "vit-b-16", "vit-l-14", "vit-l-14-336", "vit-h-14", "vit-g-14", "vit-bigg-14"} <= set(recipes)
    for name in recipes:
        load_config(name)
