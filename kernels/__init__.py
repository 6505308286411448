"""Triton ops for FineCLIP: fused region pooling and a chunked all-gather contrastive loss.

Each op lives in its own subpackage (kernel -> launcher -> autograd Function -> functional API ->
nn.Module) next to the pure-torch reference it must match. The entry points are imported lazily so
that using one op never imports (or compiles) the other.
"""
from __future__ import annotations

import importlib
from typing import Any

_ENTRY_POINTS = {"contrastive_loss": "kernels.contrastive", "region_pool": "kernels.roi_pool"}

__all__ = sorted(_ENTRY_POINTS)


def __getattr__(name: str) -> Any:
    if name not in _ENTRY_POINTS:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(_ENTRY_POINTS[name]), name)
