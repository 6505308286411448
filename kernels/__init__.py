"""Triton ops for FineCLIP: fused region pooling and a chunked all-gather contrastive loss.

Each op lives in its own subpackage (kernel -> launcher -> autograd Function -> functional API ->
nn.Module) next to the pure-torch reference it must match.
"""
from kernels.contrastive import contrastive_loss
from kernels.roi_pool import region_pool

__all__ = ["contrastive_loss", "region_pool"]
