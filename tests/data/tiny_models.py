"""A tiny random-weight torchvision detector the data tests build locally (nothing downloads)."""
from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_detector(path: Path, architecture: str = "fasterrcnn_mobilenet_v3_large_320_fpn",
                       num_classes: int = 3) -> Path:
    from torchvision.models import get_model

    torch.manual_seed(0)
    torch.save(get_model(architecture, weights=None, weights_backbone=None, num_classes=num_classes).state_dict(), path)
    return path
