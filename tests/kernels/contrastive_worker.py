"""One rank of the multi-process contrastive-loss test (gloo, CPU): our loss and open_clip's, saved to disk.

Every rank builds the same global batch from a shared seed and keeps its own rows, so the parent
test can recompute every rank's loss in float64 from the global tensors alone.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

# "mixed": rank 0 passes no mask, the others an all-true one (every rank must still gather masks)
MASK_KINDS = ("none", "random", "first_rank_empty", "mixed")
BACKENDS = ("torch", "triton")


def global_batch(world: int, rows: int, dim: int, seed: int) -> dict[str, torch.Tensor]:
    """Normalised features, a logit scale, masks of every kind and a per-rank upstream gradient."""
    # -> images, texts: [w*b, D] fp32; logit_scale: [1]; masks: [kinds, w*b] bool; upstream: [w]
    generator = torch.Generator().manual_seed(seed)
    total = world * rows
    images = F.normalize(torch.randn(total, dim, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(total, dim, generator=generator), dim=-1)
    random_mask = torch.rand(total, generator=generator) < 0.7
    empty_first = random_mask.clone()
    empty_first[:rows] = False
    every = torch.ones(total, dtype=torch.bool)
    masks = torch.stack([every, random_mask, empty_first, every])
    upstream = 0.5 + torch.rand(world, generator=generator)  # ranks scale their losses differently
    return {"images": images, "texts": texts, "logit_scale": torch.tensor([11.0]), "masks": masks,
            "upstream": upstream}


def _loss_and_grads(loss_fn, images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor,
                    upstream: torch.Tensor) -> dict[str, torch.Tensor]:
    images, texts = images.clone().requires_grad_(), texts.clone().requires_grad_()
    logit_scale = logit_scale.clone().requires_grad_()
    loss = loss_fn(images, texts, logit_scale)
    (loss * upstream).backward()
    return {"loss": loss.detach(), "images": images.grad, "texts": texts.grad, "logit_scale": logit_scale.grad}


def _uneven_rows_error(loss_fn, rank: int, dim: int) -> str:
    """What rank `rank` is told when rank r passes r + 1 rows."""
    features = F.normalize(torch.randn(rank + 1, dim), dim=-1)
    try:
        loss_fn(features, features, torch.tensor(10.0), backend="torch")
    except ValueError as error:
        return str(error)
    return "no error"


def run(rank: int, world: int, port: int, rows: int, dim: int, seed: int, out_dir: str) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from open_clip.loss import ClipLoss

    from kernels.contrastive import contrastive_loss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        batch = global_batch(world, rows, dim, seed)
        own = slice(rank * rows, (rank + 1) * rows)
        images, texts, upstream = batch["images"][own], batch["texts"][own], batch["upstream"][rank]
        results = {}
        for backend in BACKENDS:
            for kind, mask in zip(MASK_KINDS, batch["masks"]):
                local_mask = None if kind == "none" or (kind == "mixed" and rank == 0) else mask[own]
                results[(backend, kind)] = _loss_and_grads(
                    lambda i, t, s: contrastive_loss(i, t, s, local_mask, backend=backend),
                    images, texts, batch["logit_scale"], upstream)
        # before open_clip's gathers, which then show that the ranks' collectives are still in step
        results["uneven"] = _uneven_rows_error(contrastive_loss, rank, dim)
        open_clip_loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
        results[("open_clip", "none")] = _loss_and_grads(open_clip_loss, images, texts, batch["logit_scale"], upstream)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_float64(rank: int, world: int, port: int, rows: int, dim: int, seed: int, out_dir: str) -> None:
    """Rank `rank` of a float64 run on the torch backend: loss and gradients saved for the parent."""
    from kernels.contrastive import contrastive_loss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        batch = global_batch(world, rows, dim, seed)
        own = slice(rank * rows, (rank + 1) * rows)
        result = _loss_and_grads(lambda i, t, s: contrastive_loss(i, t, s, backend="torch"),
                                 batch["images"][own].double(), batch["texts"][own].double(),
                                 batch["logit_scale"].double(), batch["upstream"][rank].double())
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
