"""Real multi-process DeepSpeed runs on CPU (gloo): ZeRO-2 and ZeRO-3, gradient sync, exact resume."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fineclip_ds.training.process_group import SHARED_MEMORY
from tests.training import eva_layer_scale
from tests.training.launcher import (COMMON, GLOBAL_BATCH, REPO, STEPS, launcher_env, losses, run_pretrain,
                                     write_ds_config)

pytestmark = pytest.mark.slow
EVA_LAYER_SCALE_SCRIPT = Path(eva_layer_scale.__file__)


def final_parameters(output_dir):
    return get_fp32_state_dict_from_zero_checkpoint(str(output_dir / "checkpoints"), tag=f"step_{STEPS:08d}")


def _assert_same_parameters(left, right, rtol=1e-5, atol=1e-6):
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key].float(), right[key].float(), rtol=rtol, atol=atol, msg=key)


def test_two_process_zero2_matches_one_process_on_the_concatenated_batch(runs):
    one, two = losses(runs["one_zero2"]), losses(runs["two_zero2"])
    assert [s for s, _ in one] == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor([l for _, l in two]), torch.tensor([l for _, l in one]), rtol=1e-5, atol=1e-5)
    _assert_same_parameters(final_parameters(runs["two_zero2"]), final_parameters(runs["one_zero2"]))


def test_two_process_zero3_matches_one_process(runs):
    torch.testing.assert_close(
        torch.tensor([l for _, l in losses(runs["two_zero3"])]), torch.tensor([l for _, l in losses(runs["one_zero2"])]),
        rtol=1e-5, atol=1e-5,
    )
    _assert_same_parameters(final_parameters(runs["two_zero3"]), final_parameters(runs["one_zero2"]))


def evaluation(run) -> dict[str, float]:
    """The last held-out evaluation's eval/* scalars."""
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"] if tag.startswith("eval/")}


def test_held_out_evaluation_runs_under_zero3_and_agrees_with_one_process(runs):
    one, three = evaluation(runs["one_zero2"]), evaluation(runs["two_zero3"])
    assert {"eval/box_top1", "eval/box_top5", "eval/i2t_r1", "eval/t2i_r1"} <= one.keys()
    assert one.keys() == three.keys()
    for tag in one:
        assert abs(one[tag] - three[tag]) < 1e-3, tag


def test_training_moved_the_parameters(runs):
    before = get_fp32_state_dict_from_zero_checkpoint(str(runs["one_zero2"] / "checkpoints"), tag="step_00000002")
    after = final_parameters(runs["one_zero2"])
    assert any(not torch.equal(before[k], after[k]) for k in after)


def test_resume_continues_exactly(runs, tmp_path):
    config = write_ds_config(tmp_path / "ds.json", GLOBAL_BATCH // 2, 2)
    output_dir = tmp_path / "resumed"
    run_pretrain(2, config, output_dir, *COMMON, "--set", f"train.stop_at_step={STEPS // 2}")
    run_pretrain(2, config, output_dir, *COMMON, "--resume", "auto")
    # same losses up to float reassociation (torchrun sets OMP_NUM_THREADS=1, the deepspeed launcher does not)
    torch.testing.assert_close(torch.tensor(losses(output_dir)), torch.tensor(losses(runs["two_zero2"])),
                               rtol=1e-5, atol=1e-5)
    _assert_same_parameters(final_parameters(output_dir), final_parameters(runs["two_zero2"]), rtol=0, atol=0)


def test_zero3_with_activation_checkpointing_and_sdpa_matches_one_process(runs, tmp_path):
    config = write_ds_config(tmp_path / "ds.json", GLOBAL_BATCH // 2, 3)
    output_dir = tmp_path / "zero3_checkpointed"
    run_pretrain(2, config, output_dir, *COMMON, "--set", "model.grad_checkpointing=true",
                 "--set", "model.attention=sdpa")
    torch.testing.assert_close(torch.tensor([l for _, l in losses(output_dir)]),
                               torch.tensor([l for _, l in losses(runs["one_zero2"])]), rtol=1e-5, atol=1e-5)
    _assert_same_parameters(final_parameters(output_dir), final_parameters(runs["one_zero2"]))


def test_torchrun_gives_the_deepspeed_launcher_run(runs, tmp_path):
    config = write_ds_config(tmp_path / "ds.json", GLOBAL_BATCH // 2, 2)
    output_dir = tmp_path / "torchrun"
    command = ["bash", str(REPO / "launch" / "torchrun_pretrain.sh"), "--deepspeed_config", str(config),
               "--output_dir", str(output_dir), "--set", "data.num_workers=0", "--set", "train.log_every=1", *COMMON]
    buffers_before = set(SHARED_MEMORY.glob("deepspeed_allreduce_buffer_*"))
    env = {key: value for key, value in launcher_env(2).items() if key not in ("MASTER_ADDR", "MASTER_PORT", "NNODES")}
    result = subprocess.run(command, cwd=REPO, env={**env, "GPUS_PER_NODE": "2"},  # one node, torchrun --standalone
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(SHARED_MEMORY.glob("deepspeed_allreduce_buffer_*")) <= buffers_before, "the run left RAM behind in /dev/shm"
    # same losses up to float reassociation (torchrun sets OMP_NUM_THREADS=1, the deepspeed launcher does not)
    torch.testing.assert_close(torch.tensor(losses(output_dir)), torch.tensor(losses(runs["two_zero2"])),
                               rtol=1e-5, atol=1e-5)


def test_eva02_with_layer_scale_under_zero3_with_every_parameter_partitioned_matches_one_process(tmp_path):
    """EVA02 tiny with layer scale: the value-only dense path reads the last block's gamma_1/gamma_2
    outside the block's forward. In training DeepSpeed's forward discovers such reads by itself; the
    held-out evaluation runs outside the engine's forward and gathers only what
    TimmEva.parameters_read_outside_owner_forward names (without the gammas it fails)."""
    two_config = write_ds_config(tmp_path / "two.json", 2, 3)
    settings = json.loads(two_config.read_text())
    settings["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # nothing stays whole
    two_config.write_text(json.dumps(settings))
    job = ("--max_steps", "2", "--set", f"model.name={eva_layer_scale.NAME}", "--set", "data.max_boxes=2",
           "--set", "optim.lr=1e-4", "--set", "eval.every=2", "--set", "eval.images=8", "--set", "eval.batch_size=4")
    run_pretrain(2, two_config, tmp_path / "two", *job, script=EVA_LAYER_SCALE_SCRIPT)
    run_pretrain(1, write_ds_config(tmp_path / "one.json", 4, 2), tmp_path / "one", *job, script=EVA_LAYER_SCALE_SCRIPT)
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert [step for step, _ in two] == [1, 2]
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=1e-5)
    two_parameters, one_parameters = (
        get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / run / "checkpoints"), tag="step_00000002")
        for run in ("two", "one"))
    _assert_same_parameters(two_parameters, one_parameters)
    blocks = "model.clip.visual.trunk.blocks."
    last_block = max(int(key[len(blocks):].split(".")[0]) for key in one_parameters if key.startswith(blocks))
    for gamma in ("gamma_1", "gamma_2"):
        trained = one_parameters[f"{blocks}{last_block}.{gamma}"]
        assert not torch.equal(trained, torch.full_like(trained, eva_layer_scale.LAYER_SCALE))
    two_evaluation, one_evaluation = evaluation(tmp_path / "two"), evaluation(tmp_path / "one")
    assert "eval/box_top1" in one_evaluation and two_evaluation.keys() == one_evaluation.keys()
    for tag in one_evaluation:
        assert two_evaluation[tag] == pytest.approx(one_evaluation[tag], abs=1e-3), tag


def test_zero3_with_the_optimizer_offloaded_to_the_cpu_matches_one_process(runs, tmp_path):
    """ds_configs/zero3_offload.json as shipped (micro batch set for the test): DeepSpeed's CPU AdamW."""
    ds_config = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())
    ds_config["train_micro_batch_size_per_gpu"] = GLOBAL_BATCH // 2
    config_path = tmp_path / "offload.json"
    config_path.write_text(json.dumps(ds_config))
    run_pretrain(2, config_path, tmp_path / "offload", *COMMON, "--max_steps", "2", timeout=600)
    torch.testing.assert_close(torch.tensor([l for _, l in losses(tmp_path / "offload")]),
                               torch.tensor([l for _, l in losses(runs["one_zero2"])[:2]]), rtol=1e-4, atol=1e-4)
