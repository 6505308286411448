"""The contrastive loss as callers use it: the functional `contrastive_loss` and the `ContrastiveLoss` module."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from kernels.contrastive.function import ContrastiveLossFunction, TilePasses
from kernels.contrastive.launch import SUPPORTED_DTYPES, TritonTiles, runs_on
from kernels.contrastive.torch_chunked import TorchTiles

BACKENDS = ("triton", "torch", "auto")


def _check_inputs(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                  mask: torch.Tensor | None, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend: got {backend!r}, expected one of {BACKENDS}")
    if image_features.dim() != 2 or text_features.shape != image_features.shape:
        raise ValueError(f"image_features / text_features: got shapes {tuple(image_features.shape)} / "
                         f"{tuple(text_features.shape)}, expected the same [b, D]")
    if not isinstance(logit_scale, torch.Tensor):
        raise ValueError(f"logit_scale: got {type(logit_scale).__name__}, expected a tensor of shape [] or [1] "
                         "(torch.tensor(value), with requires_grad=True to learn it)")
    if logit_scale.numel() != 1 or logit_scale.dim() > 1:
        raise ValueError(f"logit_scale: got shape {tuple(logit_scale.shape)}, expected [] or [1]")
    if mask is not None and mask.shape != image_features.shape[:1]:
        raise ValueError(f"mask: got shape {tuple(mask.shape)}, expected [{image_features.shape[0]}]")
    for name, tensor in (("text_features", text_features), ("logit_scale", logit_scale), ("mask", mask)):
        if tensor is not None and tensor.device != image_features.device:
            raise ValueError(f"{name}: got device {tensor.device}, expected the image features' {image_features.device}")


def select_passes(backend: str, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> TilePasses:
    """Triton on CUDA (or under the interpreter when asked for by name), torch otherwise; "auto" also takes
    torch for features the Triton kernels do not take (float64, or images and texts of different dtypes)."""
    triton_takes = all(dtype in SUPPORTED_DTYPES for dtype in dtypes) and len(set(dtypes)) <= 1
    if backend == "torch" or (backend == "auto" and (device.type != "cuda" or not triton_takes)):
        return TorchTiles()
    if not runs_on(device):
        raise ValueError(f"backend: got 'triton' for features on {device}, expected CUDA tensors "
                         "(or TRITON_INTERPRET=1 set before kernels.contrastive is imported)")
    return TritonTiles()


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    mask: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Symmetric InfoNCE of the rank-local rows against the whole gathered batch, chunked.

    Equals open_clip's ClipLoss(local_loss=True, gather_with_grad=True) in value and gradients on
    every rank. Rows with mask False are neither anchors nor negatives, and the value is scaled so
    that its average over ranks is the mean over all valid rows (0, with zero gradients, if none).
    Every rank of `group` calls it with the same number of rows b, as open_clip's ClipLoss requires (pad
    and mask to the largest count, as fineclip_ds's regional loss does; ranks that differ all get a ValueError);
    masks may be given on some ranks and not others.
    No b x N logits exist at any time; see function.py for the passes and their GEMM count.
    """
    # image_features, text_features: [b, D] normalised; logit_scale: [] or [1] (exponentiated); mask: [b] bool -> []
    _check_inputs(image_features, text_features, logit_scale, mask, backend)
    passes = select_passes(backend, image_features.device, (image_features.dtype, text_features.dtype))
    return ContrastiveLossFunction.apply(image_features, text_features, logit_scale,
                                         None if mask is None else mask.bool(), group, passes)


class ContrastiveLoss(nn.Module):
    """Module form of `contrastive_loss` with the process group and backend fixed at construction."""

    def __init__(self, group: dist.ProcessGroup | None = None, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend: got {backend!r}, expected one of {BACKENDS}")
        self.group = group
        self.backend = backend

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        # image_features, text_features: [b, D]; logit_scale: [] or [1]; mask: [b] bool -> []
        return contrastive_loss(image_features, text_features, logit_scale, mask, self.group, self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
