"""Evaluation on the built-in world's held-out split in the middle of training, on every rank.

Every rank runs it (ZeRO-3 gathers parameters collectively); rank 0 logs. Parameters the model reads
outside their owner's forward are gathered explicitly, since the engine's own forward is not running.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import deepspeed
import numpy as np
import torch

from fineclip_ds.config import EvalConfig
from fineclip_ds.data.shapes_world import ShapesWorld
from fineclip_ds.evaluation.dense_viz import dense_feature_picture
from fineclip_ds.evaluation.world import evaluate_on_world
from fineclip_ds.models.fineclip import FineCLIP


def evaluate_during_training(engine, model: FineCLIP, tokenizer: Callable[[list[str]], torch.Tensor],
                             normalization: tuple, world: ShapesWorld, config: EvalConfig,
                             dtype: torch.dtype) -> tuple[dict[str, float], np.ndarray]:
    """Returns eval/* scalars and the dense-feature picture of the first held-out image ([H, W, 3] uint8)."""
    engine.eval()
    gathered = (deepspeed.zero.GatheredParameters(model.parameters_read_outside_owner_forward())
                if engine.zero_optimization_stage() == 3 else nullcontext())
    with gathered, torch.no_grad():
        results = evaluate_on_world(model, tokenizer, normalization, world, config.images, config.batch_size,
                                    engine.device, dtype=dtype)
        picture = dense_feature_picture(model, normalization, world.eval_sample(0).image, engine.device, dtype)
    engine.train()
    return {f"eval/{name}": value for name, value in results.items()}, np.asarray(picture)
