"""Apply DeepSpeed to a plain objective: read and check the JSON, pick the precision the device
supports, tell ZeRO-3 about parameters read outside their owner's forward, initialise the engine."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import deepspeed
import torch
from torch import nn

log = logging.getLogger(__name__)
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
# DeepSpeed builds these from the JSON only when initialize() is given no optimizer / scheduler; this
# trainer always gives both (built from the recipe's optim.*), so a JSON section would be dead config.
RECIPE_SECTIONS = ("optimizer", "scheduler")


class DeepSpeedConfigError(ValueError):
    """The DeepSpeed JSON is missing, unreadable or asks for something this machine cannot do."""


def load_deepspeed_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DeepSpeedConfigError(f"--deepspeed_config: {path} does not exist")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DeepSpeedConfigError(f"--deepspeed_config: {path} is not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise DeepSpeedConfigError(f"--deepspeed_config: {path} holds a {type(config).__name__}, expected a JSON object")
    # HF Trainer's placeholder: DeepSpeed's section models drop a nested "auto" for their default, but use a
    # top-level value as given (gradient_clipping "auto" was a TypeError at the first step)
    placeholders = sorted(key for key, value in config.items() if value == "auto")
    if placeholders:
        raise DeepSpeedConfigError(
            f"{path}: {', '.join(placeholders)}: 'auto' is a placeholder HF Trainer fills in, and DeepSpeed reads "
            "top-level values as given; give a value, or remove the key for DeepSpeed's default")
    for key in BATCH_KEYS:  # DeepSpeed asserts on these only once the engine starts, dry runs not at all
        value = config.get(key)
        if value is not None and (type(value) is not int or value < 1):
            raise DeepSpeedConfigError(f"{path}: {key} is {value!r}, expected an integer >= 1")
    if "bfloat16" in config:  # DeepSpeed reads it where "bf16" is absent; this trainer's precision checks do not
        raise DeepSpeedConfigError(f"{path}: 'bfloat16' is DeepSpeed's old name for 'bf16'; rename it to 'bf16'")
    _check_read_sections(config, path)
    if config.get("bf16", {}).get("enabled", False) and config.get("fp16", {}).get("enabled", False):
        raise DeepSpeedConfigError(f"{path}: bf16 and fp16 are both enabled, expected at most one")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if type(stage) is not int or stage not in (0, 1, 2, 3):
        raise DeepSpeedConfigError(f"{path}: zero_optimization.stage is {stage!r}, expected 0, 1, 2 or 3")
    for key in RECIPE_SECTIONS:  # DeepSpeed lets the trainer's own optimizer and schedule win without a word
        if key in config:
            raise DeepSpeedConfigError(
                f"{path}: the '{key}' section would be ignored: the AdamW optimizer and its warmup-cosine schedule "
                f"come from the recipe (optim.lr, optim.weight_decay, optim.beta1, optim.beta2, optim.eps, "
                f"optim.warmup_steps, optim.min_lr_ratio; --set optim.lr=...); remove '{key}' from the JSON")
    if "train_micro_batch_size_per_gpu" not in config and "train_batch_size" not in config:
        raise DeepSpeedConfigError(f"{path}: set train_micro_batch_size_per_gpu (the batch size per GPU)")
    return config


def _check_read_sections(config: dict[str, Any], path: Path) -> None:
    """The sections this trainer reads before DeepSpeed does are JSON objects and their switches true/false:
    `"bf16": true` or `"zero_optimization": null` failed with an AttributeError naming no key."""
    present = {key: config[key] for key in ("bf16", "fp16", "zero_optimization") if key in config}
    zero = present.get("zero_optimization")
    if isinstance(zero, dict) and "offload_optimizer" in zero:
        present["zero_optimization.offload_optimizer"] = zero["offload_optimizer"]
    for name, section in present.items():
        if not isinstance(section, dict):
            raise DeepSpeedConfigError(f"{path}: {name} is {json.dumps(section)}, expected a JSON object")
        if "enabled" in section and type(section["enabled"]) is not bool:
            raise DeepSpeedConfigError(f"{path}: {name}.enabled is {json.dumps(section['enabled'])}, "
                                       "expected true or false")


def resolve_batch_sizes(config: dict[str, Any], world_size: int) -> tuple[int, int, int]:
    """(micro batch per GPU, accumulation steps, global batch) as DeepSpeed derives them from whichever
    of train_batch_size, train_micro_batch_size_per_gpu and gradient_accumulation_steps are set."""
    global_batch = config.get("train_batch_size")
    micro = config.get("train_micro_batch_size_per_gpu")
    accumulation = config.get("gradient_accumulation_steps")
    if global_batch is not None and micro is None:
        accumulation = accumulation or 1
        micro = global_batch // (accumulation * world_size)
    elif global_batch is not None and accumulation is None:
        accumulation = global_batch // (micro * world_size)
    micro, accumulation = micro or 1, accumulation or 1
    if global_batch is not None and (micro < 1 or accumulation < 1 or micro * accumulation * world_size != global_batch):
        raise DeepSpeedConfigError(
            f"train_batch_size={global_batch} is not train_micro_batch_size_per_gpu={config.get('train_micro_batch_size_per_gpu')}"
            f" x gradient_accumulation_steps={config.get('gradient_accumulation_steps')} x {world_size} GPUs")
    return micro, accumulation, micro * accumulation * world_size


def offloads_optimizer(config: dict[str, Any]) -> bool:
    """ZeRO-Offload: the optimizer step runs on the CPU, its states in CPU memory or swapped to NVMe (DeepSpeed
    then refuses any optimizer but its CPU Adam, as for "cpu")."""
    return config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")


def offloads_params(config: dict[str, Any]) -> bool:
    """ZeRO-3 parameter offload: the weights live off the GPU, in CPU memory or on NVMe, between their uses."""
    return config.get("zero_optimization", {}).get("offload_param", {}).get("device", "none") in ("cpu", "nvme")


def adapt_precision_to_device(config: dict[str, Any], on_gpu: bool) -> dict[str, Any]:
    """bf16/fp16 on a CPU run: an explicit, logged fallback to fp32 rather than a crash inside DeepSpeed."""
    config = copy.deepcopy(config)
    if on_gpu:
        return config
    for key in ("bf16", "fp16"):
        if config.get(key, {}).get("enabled", False):
            log.warning("%s is enabled in the DeepSpeed config but there is no GPU: training in fp32 instead", key)
            config[key]["enabled"] = False
    return config


def require_nonfinite_gradient_check(config: dict[str, Any]) -> None:
    """The precision and ZeRO stage that will run (after adapt_precision_to_device) must be ones where
    DeepSpeed 0.19.8 skips an optimizer step whose gradients hold a NaN or inf (the engine counts those
    skips). Where it does not check, one such gradient behind a finite loss makes every weight and Adam
    state NaN without a word (measured with 2 CPU ranks, 2026-11-26)."""
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    bf16, fp16 = config.get("bf16", {}).get("enabled", False), config.get("fp16", {}).get("enabled", False)
    if stage == 0 and not (bf16 or fp16):
        raise DeepSpeedConfigError(
            "zero_optimization.stage is 0 with fp32 weights (bf16/fp16 off, or no GPU): DeepSpeed does not check "
            "gradients for NaN/inf there; expected stage 1, 2 or 3")
    if stage in (1, 2) and bf16 and not config["bf16"].get("check_grad_overflow", True):
        raise DeepSpeedConfigError(
            f"bf16.check_grad_overflow is false at zero_optimization.stage {stage}: DeepSpeed would apply NaN/inf "
            "gradients; expected true")
    if fp16 and config["fp16"].get("loss_scale", 0) == 0 and not config["fp16"].get("raise_error_at_min_scale", True):
        raise DeepSpeedConfigError(
            "fp16.raise_error_at_min_scale is false: with gradients that stay NaN/inf, DeepSpeed's loss scaler would "
            "drop every step at its minimum scale and the run would redo that step forever (its search for a scale "
            "is not counted against train.max_consecutive_nonfinite); expected true")
    if stage in (1, 2) and not (bf16 or fp16) and not zero.get("compute_grad_norm", True):
        raise DeepSpeedConfigError(
            f"zero_optimization.compute_grad_norm is false at stage {stage} in fp32: DeepSpeed would apply NaN/inf "
            "gradients; expected true")


def register_zero3_external_parameters(objective: nn.Module, parameters: list[nn.Parameter]) -> None:
    for parameter in parameters:
        deepspeed.zero.register_external_parameter(objective, parameter)


def initialize(
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: dict[str, Any],
    external_parameters: list[nn.Parameter],
) -> deepspeed.DeepSpeedEngine:
    if config.get("zero_optimization", {}).get("stage", 0) == 3:
        register_zero3_external_parameters(objective, external_parameters)
    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine
