"""Class names -> text embeddings averaged over a prompt-template set (open_clip's zero-shot builder)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from fineclip_ds.models.fineclip import FineCLIP

# ViLD's detection prompts, the set region-level CLIP work (CLIPSelf, FineCLIP) evaluates boxes with.
VILD_TEMPLATES = (
    "a photo of a {}.", "This is a photo of a {}", "There is a {} in the scene", "There is the {} in the scene",
    "a photo of a {} in the scene", "a photo of a small {}.", "a photo of a medium {}.", "a photo of a large {}.",
    "This is a photo of a small {}.", "This is a photo of a medium {}.", "This is a photo of a large {}.",
    "There is a small {} in the scene.", "There is a medium {} in the scene.", "There is a large {} in the scene.",
)
TEMPLATE_SETS: dict[str, Sequence[str | Callable[[str], str]]] = {
    "openai": OPENAI_IMAGENET_TEMPLATES,
    "simple": SIMPLE_IMAGENET_TEMPLATES,
    "vild": VILD_TEMPLATES,
    "shapes": ("a {}",),  # the built-in world's region captions
}


def class_embeddings(model: FineCLIP, tokenizer: Callable[[list[str]], torch.Tensor], class_names: Sequence[str],
                     templates: str, device: torch.device) -> torch.Tensor:
    """[K, D] L2-normalised mean text embedding of each class over the named template set."""
    if templates not in TEMPLATE_SETS:
        raise ValueError(f"--templates {templates!r}: expected one of {sorted(TEMPLATE_SETS)}")
    weights = build_zero_shot_classifier(model.clip, tokenizer, list(class_names), TEMPLATE_SETS[templates],
                                         num_classes_per_batch=16, device=device)
    return weights.T.float()
