"""AdamW with open_clip's weight-decay split, and FineCLIP's warmup-then-cosine learning rate."""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from fineclip_ds.config import OptimConfig

log = logging.getLogger("fineclip_ds")


def _decays(name: str, param: nn.Parameter) -> bool:
    """open_clip's (and FineCLIP's) rule: no weight decay on 1-d tensors (norms, biases, class
    embeddings), batch/layer norms, biases and the logit scale; the positional and token embedding
    tables are decayed."""
    return not (param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name)


def build_optimizer(model: nn.Module, config: OptimConfig, cpu_offload: bool = False) -> torch.optim.Optimizer:
    """AdamW; with ZeRO-Offload (`cpu_offload`) DeepSpeed's vectorised CPU AdamW, which DeepSpeed
    requires there (torch's would also be several times slower on the CPU). It is a C++ op that
    DeepSpeed compiles on first use (about a minute) and caches."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if _decays(n, p)], "weight_decay": config.weight_decay},
        {"params": [p for n, p in named if not _decays(n, p)], "weight_decay": 0.0},
    ]
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                                adamw_mode=True)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup from 1/warmup to 1, then cosine down to min_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, config.warmup_steps, total_steps, config.min_lr_ratio)
    )


def warn_if_warmup_outlasts(config: OptimConfig, total_steps: int) -> None:
    """A warmup longer than the run never reaches optim.lr: a short smoke run does that on purpose (so it
    is not an error), a real run by a forgotten optim.warmup_steps, which only the learning-rate curve
    would show."""
    if config.warmup_steps > total_steps:
        peak = warmup_cosine(total_steps - 1, config.warmup_steps, total_steps, config.min_lr_ratio)
        log.warning("optim.warmup_steps=%d > train.max_steps=%d: the learning rate peaks at %.0f%% of optim.lr",
                    config.warmup_steps, total_steps, 100 * peak)
