"""What a run would be, without running it: resolved config, world, batch, parameters, model-state
memory per GPU (DeepSpeed's ZeRO estimators) and model FLOPs per step.

The model is built on the meta device, so a ViT-bigG plan takes a second on a laptop.
"""
from __future__ import annotations

from typing import Any

import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from fineclip_ds.config import RunConfig
from fineclip_ds.models.factory import create_fineclip
from fineclip_ds.models.fineclip import text_tower_of
from fineclip_ds.models.flops import FineCLIPShapes, step_flops
from fineclip_ds.training.build import warn_if_shards_are_not_read
from fineclip_ds.training.parallelize import (DeepSpeedConfigError, adapt_precision_to_device, offloads_optimizer,
                                              offloads_params, require_nonfinite_gradient_check, resolve_batch_sizes)

GIB = 2**30
HOST_BUFFER_FACTOR = 1.5  # DeepSpeed's estimators' additional_buffer_factor


def _frozen_weight_bytes(frozen_params: int, stage: int, world_size: int, precision_bytes: int) -> float:
    """Frozen weights carry no gradient or optimizer state: only their (bf16) copy, split under ZeRO-3."""
    return frozen_params * precision_bytes / (world_size if stage == 3 else 1)


def plan(config: RunConfig, ds_config: dict[str, Any], world_size: int, gpus_per_node: int) -> dict[str, Any]:
    require_nonfinite_gradient_check(adapt_precision_to_device(ds_config, on_gpu=True))  # refused as training would be
    with torch.device("meta"):
        model, _, _ = create_fineclip(config.model, device="meta", load_pretrained=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    blocks = list(model.tower.blocks) + list(text_tower_of(model.clip).transformer.resblocks)
    largest_layer = max(sum(p.numel() for p in block.parameters()) for block in blocks)
    zero = ds_config.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    offload_optimizer = offloads_optimizer(ds_config)
    offload_params = offloads_params(ds_config)
    gpus_per_node = min(gpus_per_node, world_size)
    if world_size % gpus_per_node:
        raise DeepSpeedConfigError(f"--world_size {world_size} is not a whole number of nodes of "
                                   f"--gpus_per_node {gpus_per_node}")
    nodes = world_size // gpus_per_node
    if stage == 3:
        cpu_bytes, gpu_bytes, _ = estimate_zero3_model_states_mem_needs(  # zero_init=False: built whole, as below
            trainable, largest_layer, gpus_per_node, nodes, cpu_offload=offload_optimizer,
            cpu_offload_params=offload_params, zero_init=False)
    else:
        cpu_bytes, gpu_bytes = estimate_zero2_model_states_mem_needs(trainable, gpus_per_node, nodes,
                                                                     cpu_offload=offload_optimizer)
    half = ds_config.get("bf16", {}).get("enabled", False) or ds_config.get("fp16", {}).get("enabled", False)
    gpu_bytes += _frozen_weight_bytes(frozen, stage, world_size, 2 if half else 4)
    # Every rank builds the whole model in fp32 on the host before DeepSpeed moves and shards it (no
    # zero.Init), frozen towers included: the estimators count only the parameters they are given.
    cpu_bytes += frozen * 4 * gpus_per_node * HOST_BUFFER_FACTOR
    micro_batch, accumulation, global_batch = resolve_batch_sizes(ds_config, world_size)
    warn_if_shards_are_not_read(config.data)
    images = micro_batch
    regions = micro_batch * config.data.max_boxes
    weights = {"gc": config.losses.w_gc, "sd": config.losses.w_sd, "rc": config.losses.w_rc}
    shapes = FineCLIPShapes.of(model.clip)
    flops = None if shapes is None else step_flops(shapes, images, regions, regions, world_size,
                                                   not config.model.freeze_text, config.losses.sd_teacher_grad,
                                                   weights)
    return {
        "model": config.model.name,
        "image_size": list(model.image_size),
        "world_size": world_size,
        "nodes": nodes,
        "zero_stage": stage,
        "offload_optimizer": offload_optimizer,
        "offload_params": offload_params,
        "micro_batch_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "global_batch": global_batch,
        "parameters": {"trainable": trainable, "frozen": frozen, "largest_block": largest_layer},
        "model_states_gib_per_gpu": round(gpu_bytes / GIB, 2),
        "model_states_gib_cpu_per_node": round(cpu_bytes / GIB, 2),
        "note": "model states only (weights, gradients, Adam states); activations come on top. Host memory: "
                "every rank builds the whole fp32 model before it is sharded",
        "model_tflops_per_gpu_step_at_max_boxes": None if flops is None else round(flops * accumulation / 1e12, 3),
        "config": config.to_dict(),
    }
