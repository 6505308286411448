"""Evaluation on the built-in world's held-out split in the middle of training, on every rank.

Every rank runs it (ZeRO-3 gathers parameters collectively); rank 0 logs. Parameters the model reads
outside their owner's forward are gathered explicitly, since the engine's own forward is not running.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import deepspeed
import numpy as np
import torch

from fineclip_ds.config import EvalConfig
from fineclip_ds.data.shapes_world import ShapesWorld
from fineclip_ds.evaluation.dense_viz import dense_feature_picture
from fineclip_ds.evaluation.world import evaluate_on_world
from fineclip_ds.models.fineclip import FineCLIP


@contextmanager
def _gathered_while_owners_run(parameters: list[torch.nn.Parameter]) -> Iterator[None]:
    """ZeRO-3: gather `parameters` and keep them gathered for the whole block. GatheredParameters
    alone does not: an owner module's own forward releases its parameters on exit (EVA's last
    attention runs before the value-only path reads its qkv weight, q/v biases and the block's
    layer-scale gammas). In training DeepSpeed's forward re-gathers such reads by itself; outside
    the engine's forward nothing does. Its hooks leave parameters marked external alone."""
    parameters = list({id(parameter): parameter for parameter in parameters}.values())
    with deepspeed.zero.GatheredParameters(parameters):
        marked = [(parameter, getattr(parameter, "is_external_param", False)) for parameter in parameters]
        for parameter, _ in marked:
            parameter.is_external_param = True
        try:
            yield
        finally:
            for parameter, was_external in marked:
                parameter.is_external_param = was_external


def evaluate_during_training(engine, model: FineCLIP, tokenizer: Callable[[list[str]], torch.Tensor],
                             normalization: tuple, world: ShapesWorld, config: EvalConfig,
                             dtype: torch.dtype) -> tuple[dict[str, float], np.ndarray]:
    """Returns eval/* scalars and the dense-feature picture of the first held-out image ([H, W, 3] uint8)."""
    engine.eval()
    gathered = (_gathered_while_owners_run(model.parameters_read_outside_owner_forward())
                if engine.zero_optimization_stage() == 3 else nullcontext())
    with gathered, torch.no_grad():
        results = evaluate_on_world(model, tokenizer, normalization, world, config.images, config.batch_size,
                                    engine.device, dtype=dtype)
        picture = dense_feature_picture(model, normalization, world.eval_sample(0).image, engine.device, dtype)
    engine.train()
    return {f"eval/{name}": value for name, value in results.items()}, np.asarray(picture)
