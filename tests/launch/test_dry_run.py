"""`launch/pretrain.py --dry_run` plans big recipes on a CPU without building real weights."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _dry_run(recipe: str, ds_config: str, world_size: int, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "launch/pretrain.py", "--recipe", recipe, "--deepspeed_config",
                             f"ds_configs/{ds_config}", "--dry_run", "--world_size", str(world_size), *args],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _plan(recipe: str, ds_config: str, world_size: int) -> dict:
    result = _dry_run(recipe, ds_config, world_size)
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
    # every rank builds the whole fp32 model on the host before DeepSpeed shards it (no zero.Init): 0.56 GiB
    # was reported for ViT-L/14 where its 8 ranks take 12.8 GiB
    whole_model_gib = sum(plan["parameters"][kind] for kind in ("trainable", "frozen")) * 4 * 8 / 2**30
    assert plan["model_states_gib_cpu_per_node"] >= whole_model_gib


def test_zero3_model_states_shrink_with_more_gpus():
    small, large = _plan("vit-bigg-14", "zero3_vit_bigg.json", 8), _plan("vit-bigg-14", "zero3_vit_bigg.json", 64)
    assert large["model_states_gib_per_gpu"] < small["model_states_gib_per_gpu"] / 4


BATCH_SETTINGS = [  # (train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps)
    (None, 32, None), (None, 32, 4), (1024, 32, None), (256, None, None), (1024, None, 2), (1024, 32, 4),
]


@pytest.mark.parametrize("global_batch,micro,accumulation", BATCH_SETTINGS)
def test_batch_sizes_are_derived_as_deepspeed_derives_them(monkeypatch, global_batch, micro, accumulation):
    import deepspeed.runtime.config as deepspeed_config

    from fineclip_ds.training.parallelize import resolve_batch_sizes

    settings = {"train_batch_size": global_batch, "train_micro_batch_size_per_gpu": micro,
                "gradient_accumulation_steps": accumulation}
    config = {key: value for key, value in settings.items() if value is not None}
    monkeypatch.setattr(deepspeed_config.dist, "get_rank", lambda *args, **kwargs: 0)
    monkeypatch.setattr(deepspeed_config.dist, "get_world_size", lambda *args, **kwargs: 8)
    expected = deepspeed_config.DeepSpeedConfig(dict(config))
    assert resolve_batch_sizes(config, world_size=8) == (
        expected.train_micro_batch_size_per_gpu, expected.gradient_accumulation_steps, expected.train_batch_size)


def test_inconsistent_batch_sizes_are_a_config_error():
    from fineclip_ds.training.parallelize import DeepSpeedConfigError, resolve_batch_sizes

    with pytest.raises(DeepSpeedConfigError, match="train_batch_size=1000 is not"):
        resolve_batch_sizes({"train_batch_size": 1000, "train_micro_batch_size_per_gpu": 32}, world_size=8)


def test_dry_run_reads_a_global_train_batch_size(tmp_path):
    ds_config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds_config.update({"train_batch_size": 1024, "train_micro_batch_size_per_gpu": 32})
    ds_config.pop("gradient_accumulation_steps", None)
    path = tmp_path / "global_batch.json"
    path.write_text(json.dumps(ds_config))
    result = subprocess.run([sys.executable, "launch/pretrain.py", "--recipe", "vit-b-16", "--deepspeed_config",
                             str(path), "--dry_run", "--world_size", "8"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout[result.stdout.index("{\n"):])
    assert (plan["micro_batch_per_gpu"], plan["gradient_accumulation_steps"], plan["global_batch"]) == (32, 4, 1024)


def test_a_world_that_is_not_whole_nodes_is_refused():
    result = subprocess.run([sys.executable, "launch/pretrain.py", "--recipe", "vit-b-16", "--deepspeed_config",
                             "ds_configs/zero2.json", "--dry_run", "--world_size", "12"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--world_size 12 is not a whole number of nodes" in result.stderr


@pytest.mark.parametrize("per_node", ["LOCAL_WORLD_SIZE", "LOCAL_SIZE"])  # torchrun's, the deepspeed launcher's
def test_a_dry_run_under_a_launcher_plans_its_nodes(per_node):
    """`NNODES=2 GPUS_PER_NODE=4 bash launch/torchrun_pretrain.sh ... --dry_run`: the world came from WORLD_SIZE
    but the node from --gpus_per_node's default 8, so 2 x 4 GPUs were planned as one node (each node's host
    memory for 8 ranks) and 3 x 4 was refused as not whole nodes of 8."""
    for nodes in (2, 3):
        env = {**os.environ, "WORLD_SIZE": str(4 * nodes), per_node: "4"}
        result = subprocess.run([sys.executable, "launch/pretrain.py", "--recipe", "vit-b-16", "--deepspeed_config",
                                 "ds_configs/zero2.json", "--dry_run"], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        plan = json.loads(result.stdout[result.stdout.index("{\n"):])
        assert (plan["world_size"], plan["nodes"]) == (4 * nodes, nodes)


def test_dry_run_plans_an_eva_tower():
    """EVA02 (timm Eva image tower, text tower under clip.text): its blocks and its FLOPs are planned too."""
    from fineclip_ds.config import ModelConfig, RunConfig
    from fineclip_ds.training.dry_run import plan

    config = RunConfig(model=ModelConfig(name="EVA02-L-14"))
    ds_config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    report = plan(config, ds_config, world_size=8, gpus_per_node=8)
    assert 300 <= report["parameters"]["trainable"] / 1e6 <= 310  # EVA02-L/14 image tower; text frozen
    assert report["parameters"]["largest_block"] > 12e6
    assert report["model_tflops_per_gpu_step_at_max_boxes"] > 0


def test_a_config_training_would_refuse_is_refused_by_the_dry_run(tmp_path):
    """The plan is for GPUs: bf16 at ZeRO-2 without DeepSpeed's gradient check would apply NaN/inf gradients."""
    ds_config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds_config["bf16"]["check_grad_overflow"] = False
    path = tmp_path / "unchecked.json"
    path.write_text(json.dumps(ds_config))
    result = subprocess.run([sys.executable, "launch/pretrain.py", "--recipe", "vit-b-16", "--deepspeed_config",
                             str(path), "--dry_run", "--world_size", "8"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "bf16.check_grad_overflow is false" in result.stderr, result.stderr[-3000:]


@pytest.fixture(scope="module")
def vit_b_16_printed() -> str:
    """What a dry run of the vit-b-16 recipe (text tower frozen, no model.pretrained) prints."""
    result = _dry_run("vit-b-16", "zero2.json", 8)
    return result.stdout + result.stderr


def test_dry_run_does_not_say_the_model_was_initialized_randomly(vit_b_16_printed):
    """It builds no weights at all (the meta device): open_clip's notice of a random init is not true of it."""
    assert "initialized randomly" not in vit_b_16_printed


def test_dry_run_warns_of_a_frozen_text_tower_left_random(vit_b_16_printed):
    assert "model.freeze_text is true but model.pretrained is not set: the text tower stays at its random " \
           "initialisation" in vit_b_16_printed


def test_dry_run_warns_that_shards_of_a_synthetic_run_are_not_read():
    """The recipe's shards with data.source=synthetic (as a GPU benchmark overrides it): a run warns of it."""
    result = _dry_run("vit-b-16", "zero2.json", 8, "--set", "data.source=synthetic")
    assert "data.train_shards='data/regions/regions-{000000..000099}.tar' is not read" in result.stderr


def test_output_dir_and_resume_flags_are_taken_as_given_not_parsed_as_yaml(tmp_path):
    """--output_dir and --resume are paths: read as YAML, `runs/exp #2` lost its ' #2' as a comment (the run
    wrote into runs/exp) and a path with ': ' became a mapping."""
    output_dir, resume = tmp_path / "exp #2", tmp_path / "ckpt: 1"
    resume.mkdir()
    result = _dry_run("tiny-cpu", "zero2.json", 1, "--output_dir", str(output_dir), "--resume", str(resume))
    config = json.loads(result.stdout[result.stdout.index("{\n"):])["config"]
    assert (config["train"]["output_dir"], config["train"]["resume"]) == (str(output_dir), str(resume))


def test_parameters_offloaded_to_nvme_are_planned_off_the_gpu_as_on_the_cpu():
    """--dry_run took offload_param on NVMe for no offload: every ZeRO-3 weight was counted on the GPU."""
    from fineclip_ds.config import load_config
    from fineclip_ds.training.dry_run import plan

    config = load_config("vit-b-16", ["data.source=synthetic"])
    plans = {}
    for device in ("none", "cpu", "nvme"):
        ds_config = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())
        ds_config["zero_optimization"]["offload_param"] = {"device": device, "nvme_path": "/local_nvme"}
        plans[device] = plan(config, ds_config, world_size=8, gpus_per_node=8)
    assert [plans[device]["offload_params"] for device in ("none", "cpu", "nvme")] == [False, True, True]
    assert plans["nvme"]["model_states_gib_per_gpu"] == plans["cpu"]["model_states_gib_per_gpu"]
    assert plans["cpu"]["model_states_gib_per_gpu"] < plans["none"]["model_states_gib_per_gpu"]
