"""A finite loss with a NaN/inf gradient (an overflow in backward): the loss guard lets it through, so
DeepSpeed must drop the optimizer step on every rank, and the engine must count the skip, redo the step
and stop after train.max_consecutive_nonfinite in a row. Fault injection with 2 real CPU processes."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fineclip_ds.config import RunConfig
from fineclip_ds.training.engine import Clocks, train_step
from fineclip_ds.training.nonfinite import NonFiniteGuard, NonFiniteLossError
from fineclip_ds.training.optimizer import warmup_cosine
from fineclip_ds.training import parallelize
from tests.training.launcher import FAULT_JOB as JOB
from tests.training.launcher import FAULT_STEPS as STEPS
from tests.training.launcher import NONFINITE_SCRIPT, REPO, losses, nonfinite_env, run_pretrain, write_ds_config


def _run_with_inf_gradients(config: Path, output_dir: Path, calls: str, *args: str):
    return run_pretrain(2, config, output_dir, *JOB, *args, script=NONFINITE_SCRIPT, check=False,
                        env=nonfinite_env("gradient", calls, rank=1))


def _non_finite_tensors_in_checkpoints(checkpoints: Path) -> dict[str, str]:
    """Saved tensors (weights, fp32 masters, Adam moments) holding a NaN or inf: file/key path -> where and how many,
    so that a failure says which tensor and which elements (a flat ZeRO partition's padding, or a parameter)."""
    def tensors(value, key):
        if torch.is_tensor(value):
            yield key, value
        elif isinstance(value, dict):
            for name, item in value.items():
                yield from tensors(item, f"{key}/{name}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                yield from tensors(item, f"{key}/{index}")

    found = {}
    for path in sorted(checkpoints.rglob("*.pt")):
        saved = torch.load(path, weights_only=False, map_location="cpu")
        for key, tensor in tensors(saved, str(path.relative_to(checkpoints))):
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                where = (~torch.isfinite(tensor.reshape(-1))).nonzero().reshape(-1)
                found[key] = (f"{where.numel()} of {tensor.numel()} elements ({int(tensor.isnan().sum())} NaN), "
                              f"first at {where[:8].tolist()}")
    return found


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_offload.json", "zero2_vit_l.json"])
@pytest.mark.parametrize("on_gpu", [False, True], ids=["cpu", "gpu"])
def test_the_shipped_configs_let_deepspeed_check_gradients(name, on_gpu):
    shipped = parallelize.load_deepspeed_config(REPO / "ds_configs" / name)
    parallelize.require_nonfinite_gradient_check(parallelize.adapt_precision_to_device(shipped, on_gpu))


@pytest.mark.parametrize("settings, field", [
    ({}, "zero_optimization.stage is 0"),
    ({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}, "cpu": True}, "zero_optimization.stage is 0"),
    ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True, "check_grad_overflow": False}},
     "bf16.check_grad_overflow is false"),
    ({"zero_optimization": {"stage": 1, "compute_grad_norm": False}}, "zero_optimization.compute_grad_norm is false"),
])
def test_configs_where_deepspeed_applies_non_finite_gradients_are_refused(settings, field):
    """Measured with 2 CPU ranks (DeepSpeed 0.19.8): one inf gradient made every weight and Adam moment NaN."""
    settings = dict(settings)
    on_gpu = not settings.pop("cpu", False)
    with pytest.raises(parallelize.DeepSpeedConfigError, match=field):
        parallelize.require_nonfinite_gradient_check(parallelize.adapt_precision_to_device(settings, on_gpu))


def test_an_fp16_loss_scaler_that_never_gives_up_is_refused():
    """DeepSpeed's fp16 scaler skips steps while it searches for a scale, uncounted here; with
    raise_error_at_min_scale false it would skip at its minimum forever on gradients that stay NaN/inf."""
    settings = {"zero_optimization": {"stage": 2}, "fp16": {"enabled": True, "raise_error_at_min_scale": False}}
    with pytest.raises(parallelize.DeepSpeedConfigError, match="fp16.raise_error_at_min_scale is false"):
        parallelize.require_nonfinite_gradient_check(settings)
    settings["fp16"]["loss_scale"] = 128  # a static scale: its skips are counted, the run stops
    parallelize.require_nonfinite_gradient_check(settings)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_inf_gradients_behind_finite_losses_are_skipped_on_every_rank_counted_and_redone(tmp_path, stage):
    config = write_ds_config(tmp_path / "ds.json", micro_batch=16, stage=stage)
    output_dir = tmp_path / "run"
    result = _run_with_inf_gradients(config, output_dir, calls="3,4,9")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert [step for step, _ in losses(output_dir)] == list(range(1, STEPS + 1))
    assert not _non_finite_tensors_in_checkpoints(output_dir / "checkpoints")
    events = EventAccumulator(str(output_dir / "tensorboard"))
    events.Reload()
    assert events.Scalars("train/skipped_nonfinite")[-1].value == 3
    assert events.Scalars("data/samples")[-1].value == (STEPS + 3) * 32  # the dropped steps' batches were consumed
    # the schedule is not moved on by a dropped step (DeepSpeed holds it): step s trains at the lr of step s
    optim = json.loads((output_dir / "config.json").read_text())["optim"]
    assert [event.value for event in events.Scalars("train/lr")] == pytest.approx(
        [optim["lr"] * warmup_cosine(s, optim["warmup_steps"], STEPS, optim["min_lr_ratio"]) for s in range(STEPS)])


@pytest.mark.slow
def test_inf_gradients_in_a_row_stop_the_run_with_the_last_good_state_saved(tmp_path):
    config = write_ds_config(tmp_path / "ds.json", micro_batch=16, stage=2)
    output_dir = tmp_path / "run"
    result = _run_with_inf_gradients(config, output_dir, ",".join(str(call) for call in range(6, 40)),
                                     "--set", "train.max_consecutive_nonfinite=3")
    assert result.returncode != 0, "the run went on to max_steps without an update"
    assert "non-finite gradient at step 5" in result.stdout + result.stderr
    checkpoints = output_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000005"
    assert not _non_finite_tensors_in_checkpoints(checkpoints)
    assert [step for step, _ in losses(output_dir)] == list(range(1, 6))


@pytest.mark.slow
def test_zero_stage_0_in_fp32_is_refused_before_an_inf_gradient_makes_every_weight_nan(tmp_path):
    config = write_ds_config(tmp_path / "ds.json", micro_batch=16, stage=2)
    settings = json.loads(config.read_text())
    settings["zero_optimization"]["stage"] = 0  # bf16 is turned off on this CPU machine: fp32
    config.write_text(json.dumps(settings))
    output_dir = tmp_path / "run"
    result = _run_with_inf_gradients(config, output_dir, calls="3")
    assert not _non_finite_tensors_in_checkpoints(output_dir / "checkpoints")
    assert result.returncode != 0
    assert "zero_optimization.stage is 0 with fp32 weights" in result.stdout + result.stderr


class _OverflowingFp16Engine:
    """Every optimizer step overflows, as DeepSpeed's fp16 optimizer with a static loss scale reports it."""
    device = torch.device("cpu")

    def __init__(self, dynamic: bool):
        self.skipped_steps = 0
        self.dynamic = dynamic

    def __call__(self, batch):
        return torch.tensor(1.0), {"gc": torch.tensor(1.0), "logit_scale": torch.tensor(1.0)}

    def backward(self, loss):
        pass

    def step(self):
        self.skipped_steps += 1  # overflow: DeepSpeed drops the step

    def fp16_enabled(self):
        return True

    def dynamic_loss_scale(self):
        return self.dynamic

    def was_step_applied(self):
        return False


class _Run:
    def __init__(self, engine):
        self.engine = engine
        self.nonfinite = NonFiniteGuard(3)
        self.accumulation = 1
        self.micro_batch = 1
        self.world_size = 1
        self.image_dtype = torch.float32
        self.data_counts = Counter()
        self.shapes = None
        self.saved = []
        self.checkpoint_dir = "checkpoints"
        self.config = RunConfig()
        self.config.train.max_consecutive_nonfinite = 3


def _batches(limit: int):
    for _ in range(limit):
        yield {"data_stats": {"samples": 1}, "images": torch.zeros(1, 3, 4, 4), "texts": torch.zeros(1, 4),
               "boxes": torch.zeros(1, 1, 4), "box_mask": torch.zeros(1, 1, dtype=torch.bool),
               "region_texts": torch.zeros(1, 1, 4)}


def test_fp16_static_loss_scale_overflows_stop_the_run(monkeypatch):
    """fp16 with a static loss scale ("loss_scale": 128): DeepSpeed drops every overflowing step and never lowers
    the scale or raises, so those skips count like bf16's; uncounted, the run redid the step forever."""
    run = _Run(_OverflowingFp16Engine(dynamic=False))
    monkeypatch.setattr("fineclip_ds.training.engine._save", lambda run, clocks, step: run.saved.append(step))
    # 1000 batches stand in for an endless stream: the current code exhausts them (StopIteration), never stopping
    with pytest.raises(NonFiniteLossError):
        train_step(run, Clocks(), _batches(1000), step=7)
    assert run.saved == [7]
    assert run.nonfinite.skipped == 3


class _Fp16EngineAtItsMinimumScale(_OverflowingFp16Engine):
    def step(self):
        raise Exception("Current loss scale already at minimum - cannot decrease scale anymore. Exiting run.")


def test_fp16_loss_scale_at_its_minimum_stops_the_run_with_the_last_good_state_saved(monkeypatch):
    """DeepSpeed's dynamic fp16 scaler raises a bare Exception there: a traceback and exit 1 without a checkpoint."""
    run = _Run(_Fp16EngineAtItsMinimumScale(dynamic=True))
    monkeypatch.setattr("fineclip_ds.training.engine._save", lambda run, clocks, step: run.saved.append(step))
    with pytest.raises(NonFiniteLossError, match="fp16's loss scale reached fp16.min_loss_scale .* at step 7"):
        train_step(run, Clocks(), _batches(10), step=7)
    assert run.saved == [7]


def test_other_errors_of_an_optimizer_step_are_not_taken_for_the_fp16_minimum(monkeypatch):
    class _FailingEngine(_OverflowingFp16Engine):
        def step(self):
            raise Exception("some other DeepSpeed failure")

    run = _Run(_FailingEngine(dynamic=True))
    monkeypatch.setattr("fineclip_ds.training.engine._save", lambda run, clocks, step: run.saved.append(step))
    with pytest.raises(Exception, match="some other DeepSpeed failure"):
        train_step(run, Clocks(), _batches(10), step=7)
    assert run.saved == []
