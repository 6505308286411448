"""Chunked all-gather symmetric contrastive loss (Triton on CUDA, tiled torch elsewhere)."""
from kernels.contrastive.api import BACKENDS, ContrastiveLoss, contrastive_loss
from kernels.contrastive.reference import reference_losses

__all__ = ["BACKENDS", "ContrastiveLoss", "contrastive_loss", "reference_losses"]
