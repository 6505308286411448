"""A test-only EVA02 tower with layer scale (timm Eva's gamma_1/gamma_2), which no shipped config has.

open_clip's TimmModel passes timm no model kwargs beyond drop rates, so `init_values` cannot come from
an open_clip config: the tower is registered with timm under its own name, and an open_clip config
(the shipped FineCLIP-EVA02-T-14 with that timm name) is registered beside it. Importing this module
registers both. Run as a script, it is launch/pretrain.py with them registered.
"""
import json
import runpy
import tempfile
from pathlib import Path

import open_clip
from timm.models import register_model
from timm.models.eva import eva02_tiny_patch14_224

from fineclip_ds.models.factory import MODEL_CONFIG_DIR

NAME = "FineCLIP-EVA02-T-14-LayerScale"
LAYER_SCALE = 0.5  # gamma's initial value: far from 1 (and from timm's usual 1e-5), so a missed gamma shows


@register_model
def eva02_tiny_layer_scale_patch14_224(pretrained: bool = False, **kwargs):
    return eva02_tiny_patch14_224(pretrained=pretrained, init_values=LAYER_SCALE, **kwargs)


def _register_open_clip_config() -> None:
    config = json.loads((MODEL_CONFIG_DIR / "FineCLIP-EVA02-T-14.json").read_text())
    config["vision_cfg"]["timm_model_name"] = eva02_tiny_layer_scale_patch14_224.__name__
    with tempfile.TemporaryDirectory() as folder:  # read once into open_clip's registry, which keeps it
        path = Path(folder) / f"{NAME}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)


_register_open_clip_config()

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).resolve().parents[2] / "launch" / "pretrain.py"), run_name="__main__")
