"""Real multi-process DeepSpeed runs on CPU (gloo): ZeRO-2 and ZeRO-3, gradient sync, exact resume."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fineclip_ds.training.process_group import SHARED_MEMORY
from tests.training.launcher import (COMMON, GLOBAL_BATCH, REPO, STEPS, free_port, launcher_env, losses, run_pretrain,
                                     write_ds_config)

pytestmark = pytest.mark.slow


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


def test_held_out_evaluation_runs_under_zero3_and_agrees_with_one_process(runs):
    def evaluation(run) -> dict[str, float]:
        events = EventAccumulator(str(run / "tensorboard"))
        events.Reload()
        return {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"] if tag.startswith("eval/")}

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
    port = free_port()
    result = subprocess.run(command, cwd=REPO, env={**launcher_env(2), "GPUS_PER_NODE": "2", "MASTER_PORT": str(port)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(SHARED_MEMORY.glob(f"deepspeed_allreduce_buffer_*_{port}_*")), "the run left RAM behind in /dev/shm"
    # same losses up to float reassociation (torchrun sets OMP_NUM_THREADS=1, the deepspeed launcher does not)
    torch.testing.assert_close(torch.tensor(losses(output_dir)), torch.tensor(losses(runs["two_zero2"])),
                               rtol=1e-5, atol=1e-5)


def test_eva02_trains_under_zero3_with_every_parameter_partitioned(tmp_path):
    config = write_ds_config(tmp_path / "ds.json", 2, 3)
    settings = json.loads(config.read_text())
    settings["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # nothing stays whole
    config.write_text(json.dumps(settings))
    output_dir = tmp_path / "eva"
    run_pretrain(2, config, output_dir, "--max_steps", "2", "--set", "model.name=FineCLIP-EVA02-T-14",
                 "--set", "data.max_boxes=2", "--set", "optim.lr=1e-4")
    curve = losses(output_dir)
    assert [step for step, _ in curve] == [1, 2] and all(loss == loss for _, loss in curve)


def test_zero3_with_the_optimizer_offloaded_to_the_cpu_matches_one_process(runs, tmp_path):
    """ds_configs/zero3_offload.json as shipped (micro batch set for the test): DeepSpeed's CPU AdamW."""
    ds_config = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())
    ds_config["train_micro_batch_size_per_gpu"] = GLOBAL_BATCH // 2
    config_path = tmp_path / "offload.json"
    config_path.write_text(json.dumps(ds_config))
    run_pretrain(2, config_path, tmp_path / "offload", *COMMON, "--max_steps", "2", timeout=600)
    torch.testing.assert_close(torch.tensor([l for _, l in losses(tmp_path / "offload")]),
                               torch.tensor([l for _, l in losses(runs["one_zero2"])[:2]]), rtol=1e-4, atol=1e-4)
