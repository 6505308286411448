"""Build FineCLIP through open_clip by model name; our tiny configs are registered on import."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import open_clip
import torch

from fineclip_ds.config import ModelConfig
from fineclip_ds.models.fineclip import FineCLIP

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

Tokenizer = Callable[[list[str]], torch.Tensor]


def create_fineclip(config: ModelConfig, device: torch.device | str = "cpu"
                    ) -> tuple[FineCLIP, Tokenizer, tuple[tuple[float, ...], tuple[float, ...]]]:
    """Return the model, its tokenizer and its (mean, std) image normalisation.

    `config.pretrained` is a local checkpoint file (open_clip or OpenAI format); nothing is downloaded.
    `device="meta"` (inside `with torch.device("meta")`) builds the structure without memory, for planning.
    """
    if config.name not in open_clip.list_models():
        raise ValueError(f"model.name: '{config.name}' is not an open_clip model (see open_clip.list_models())")
    size = config.image_size
    force_image_size = tuple(size) if isinstance(size, list) else size  # positional embeddings interpolated
    clip = open_clip.create_model(config.name, pretrained=config.pretrained, nonscalar_logit_scale=True, device=device,
                                  force_image_size=force_image_size)
    model = FineCLIP(
        clip, freeze_text=config.freeze_text, grad_checkpointing=config.grad_checkpointing,
        checkpoint_every=config.checkpoint_every, attention=config.attention,
    )
    tokenizer = open_clip.get_tokenizer(config.name)
    mean = tuple(getattr(clip.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(getattr(clip.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
    return model, tokenizer, (mean, std)
