"""Build FineCLIP through open_clip by model name; our tiny configs are registered on import."""
from __future__ import annotations

import difflib
import pickle
from pathlib import Path
from typing import Callable

import open_clip
import torch
import torch.nn.functional as F

from fineclip_ds.config import ConfigError, ModelConfig
from fineclip_ds.models.fineclip import FineCLIP

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

Tokenizer = Callable[[list[str]], torch.Tensor]


def _native_grid(name: str) -> tuple[int, int] | None:
    """The patch grid an open_clip ViT config (and so its checkpoints) was trained at; None for timm towers."""
    vision = open_clip.get_model_config(name).get("vision_cfg", {})
    size, patch = vision.get("image_size"), vision.get("patch_size")
    if size is None or patch is None or vision.get("timm_model_name"):
        return None
    (height, width), (patch_h, patch_w) = [(v, v) if isinstance(v, int) else tuple(v) for v in (size, patch)]
    return height // patch_h, width // patch_w


def _resample_same_length_positional_grid(clip: torch.nn.Module, name: str) -> None:
    """Resample the loaded positional table when the new grid has as many tokens as the checkpoint's
    but another shape (8 x 8 -> 4 x 16): open_clip resizes only when the token count changes, so the
    table would otherwise be read in the wrong layout. Same interpolation as open_clip's resize, and
    the same assumption: the checkpoint is at its model config's size (true of open_clip's and
    OpenAI's weights, and of our exports, whose config records the trained size)."""
    native, table = _native_grid(name), getattr(clip.visual, "positional_embedding", None)
    grid = tuple(getattr(clip.visual, "grid_size", ()))
    if native is None or table is None or grid == native or grid[0] * grid[1] != native[0] * native[1]:
        return
    # table: [1 + H*W, C] (class token first)
    image_part = table[1:].detach().reshape(1, *native, -1).permute(0, 3, 1, 2).float()
    resampled = F.interpolate(image_part, size=grid, mode="bicubic", antialias=True, align_corners=False)
    with torch.no_grad():
        table[1:] = resampled.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(table.dtype)


def create_fineclip(config: ModelConfig, device: torch.device | str = "cpu"
                    ) -> tuple[FineCLIP, Tokenizer, tuple[tuple[float, ...], tuple[float, ...]]]:
    """Return the model, its tokenizer and its (mean, std) image normalisation.

    `config.pretrained` is a local checkpoint file (open_clip or OpenAI format); nothing is downloaded.
    `device="meta"` (inside `with torch.device("meta")`) builds the structure without memory, for planning.
    """
    known = open_clip.list_models()
    if config.name not in known:
        close = difflib.get_close_matches(config.name, known, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"model.name: got '{config.name}', expected an open_clip model name ({hint}see "
                          "open_clip.list_models())")
    size = config.image_size
    force_image_size = tuple(size) if isinstance(size, list) else size  # positional embeddings interpolated
    try:
        clip = open_clip.create_model(config.name, pretrained=config.pretrained, nonscalar_logit_scale=True,
                                      device=device, force_image_size=force_image_size)
    except (RuntimeError, AssertionError, KeyError, EOFError, pickle.UnpicklingError) as error:
        if config.pretrained is None:
            raise
        # open_clip's shape asserts and torch's state-dict errors do not say which setting is wrong
        raise ConfigError(f"model.pretrained: {config.pretrained} does not load into model.name '{config.name}' "
                          f"(another architecture, or not a checkpoint file?): {type(error).__name__}: "
                          f"{' '.join(line.strip() for line in str(error).splitlines()[:2])}") from error
    if config.pretrained is not None:
        _resample_same_length_positional_grid(clip, config.name)
    model = FineCLIP(
        clip, freeze_text=config.freeze_text, grad_checkpointing=config.grad_checkpointing,
        checkpoint_every=config.checkpoint_every, attention=config.attention,
    )
    if any(side % patch for side, patch in zip(model.image_size, model.patch_size)):
        # the patch embedding would silently drop the remainder pixels and boxes would map off the grid
        raise ConfigError(f"model.image_size: got {list(model.image_size)}, expected multiples of {config.name}'s "
                          f"patch size {list(model.patch_size)}")
    tokenizer = open_clip.get_tokenizer(config.name)
    mean = tuple(getattr(clip.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(getattr(clip.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
    return model, tokenizer, (mean, std)
