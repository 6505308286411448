"""Config -> this rank's training data stream (and the warning for shards that are not read)."""
from __future__ import annotations

import logging
from typing import Callable

import torch

from fineclip_ds.config import DataConfig
from fineclip_ds.data.collate import RegionCollator
from fineclip_ds.data.shapes_world import ShapesWorld
from fineclip_ds.data.streams import SyntheticStream, WebDatasetStream
from fineclip_ds.data.transforms import RegionTransform

log = logging.getLogger("fineclip_ds")


def warn_if_shards_are_not_read(config: DataConfig) -> None:
    """A recipe's shards overridden to the built-in world (e.g. a GPU benchmark: legitimate), or a forgotten
    data.source: said at start, and by --dry_run."""
    if config.source == "synthetic" and config.train_shards:
        log.warning("data.train_shards=%r is not read: data.source is 'synthetic' (the built-in world); set "
                    "data.source=webdataset to train on the shards", config.train_shards)


def build_train_stream(
    config: DataConfig,
    image_size: tuple[int, int],
    normalization: tuple[tuple[float, ...], tuple[float, ...]],
    tokenizer: Callable[[list[str]], torch.Tensor],
    local_batch: int,
    rank: int,
    world_size: int,
    seed: int,
    crop_source_scale: int = 1,
) -> SyntheticStream | WebDatasetStream:
    """The built-in shapes world by default; webdataset shards in the training format otherwise."""
    transform = RegionTransform(image_size, *normalization, crop_source_scale=crop_source_scale)
    collator = RegionCollator(tokenizer, config.max_boxes)
    if config.source == "synthetic":
        warn_if_shards_are_not_read(config)
        world = ShapesWorld(seed=config.world_seed, image_size=config.world_image_size)
        return SyntheticStream(world, transform, collator, local_batch, rank, world_size, num_workers=config.num_workers)
    return WebDatasetStream(
        config.train_shards, transform, collator, local_batch, rank, world_size, num_workers=config.num_workers, seed=seed,
        max_bad_fraction=config.max_bad_fraction,
    )
