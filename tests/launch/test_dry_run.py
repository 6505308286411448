"""`launch/pretrain.py --dry_run` plans big recipes on a CPU without building real weights."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _plan(recipe: str, ds_config: str, world_size: int) -> dict:
    result = subprocess.run([sys.executable, "launch/pretrain.py", "--recipe", recipe, "--deepspeed_config",
                             f"ds_configs/{ds_config}", "--dry_run", "--world_size", str(world_size)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = result.stdout[result.stdout.index("{\n"):]  # DeepSpeed logs its accelerator choice to stdout first
    return json.loads(report)


@pytest.mark.parametrize("recipe,ds_config,trainable_millions", [
    ("vit-l-14", "zero3_vit_l.json", (300, 310)),  # ViT-L/14 image tower; the text tower is frozen
    ("vit-bigg-14", "zero3_vit_bigg.json", (1800, 1900)),
])
def test_dry_run_plans_without_training(recipe, ds_config, trainable_millions):
    plan = _plan(recipe, ds_config, world_size=64)
    low, high = trainable_millions
    assert low <= plan["parameters"]["trainable"] / 1e6 <= high
    assert plan["zero_stage"] == 3 and plan["nodes"] == 8 and plan["world_size"] == 64
    assert plan["global_batch"] == plan["micro_batch_per_gpu"] * 64
    assert 0 < plan["model_states_gib_per_gpu"] < 80
    assert plan["model_tflops_per_gpu_step_at_max_boxes"] > 0


def test_zero3_model_states_shrink_with_more_gpus():
    small, large = _plan("vit-bigg-14", "zero3_vit_bigg.json", 8), _plan("vit-bigg-14", "zero3_vit_bigg.json", 64)
    assert large["model_states_gib_per_gpu"] < small["model_states_gib_per_gpu"] / 4
