"""Data loading: the samples per second one DataLoader worker makes at the GPU recipes' sizes, on one CPU core.

Run: `python -m pytest benchmarks/bench_data_pipeline.py --benchmark-only -s`. A worker reads training-format
shards, decodes each JPEG, resizes it to the recipe's input size, checks and picks its boxes (data.max_boxes of
30), tokenises the caption and every region caption slot, and collates a batch: exactly the trainer's stream
(`build_train_stream`) with num_workers=0, so the work is timed in this process. The images are 640 x 480 JPEGs,
COCO's typical size. A rank is fed when data.num_workers x this rate, on as many free cores, reaches the rank's
training rate (samples per second per GPU). No target: the data rate needed depends on the GPU's rate.
"""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from fineclip_ds.config import load_config
from fineclip_ds.training.build import build_train_stream

BOXES_PER_IMAGE = 30
LOCAL_BATCH = 32  # ds_configs/zero2.json's micro-batch
BATCHES = 4
RECORDS = 64
# (recipe, overrides): the recipes' image sizes and max_boxes; one with teacher crops from a 2x source image
CASES = [
    ("vit-b-16", []),
    ("vit-b-16", ["losses.crop_source_scale=2"]),
    ("vit-l-14-336", []),
    ("vit-b-16-448", []),
    ("vit-b-16-640", []),
]


def _photo_like(generator: np.random.Generator) -> Image.Image:
    """640 x 480 smooth colour fields with noise: JPEG-encoded to a COCO photo's size (~60-120 KB), not noise's."""
    rows, cols = np.mgrid[0:480, 0:640]
    channels = [np.sin(rows / generator.uniform(20, 90) + generator.uniform(0, 6)) *
                np.cos(cols / generator.uniform(20, 90)) for _ in range(3)]
    pixels = (np.stack(channels, -1) * 90 + 128 + generator.normal(0, 12, (480, 640, 3))).clip(0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def _write_shard(path: Path, records: int) -> None:
    generator = np.random.default_rng(0)
    with wds.TarWriter(str(path)) as sink:
        for index in range(records):
            encoded = io.BytesIO()
            _photo_like(generator).save(encoded, format="JPEG", quality=90)
            corners = generator.uniform([0, 0], [560, 400], (BOXES_PER_IMAGE, 2))
            sizes = generator.uniform([16, 16], [240, 200], (BOXES_PER_IMAGE, 2))
            boxes = np.concatenate([corners, np.minimum(corners + sizes, [640, 480])], 1).round(1).tolist()
            words = ("red", "small", "wooden", "metal")
            region_captions = [f"a {words[box % 4]} object with a striped surface near the left edge of the table"
                               for box in range(BOXES_PER_IMAGE)]
            sink.write({"__key__": f"{index:06d}", "jpg": encoded.getvalue(),
                        "txt": "a person sitting at a wooden table with a laptop, a cup of coffee and a lamp",
                        "json": {"boxes": boxes, "region_captions": region_captions}})


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data_pipeline") / "regions-000000.tar"
    _write_shard(path, RECORDS)
    return path


def _stream(recipe: str, overrides: list[str], shard: Path):
    import open_clip

    config = load_config(recipe, [f"data.train_shards={shard}", "data.num_workers=0", *overrides])
    vision = open_clip.get_model_config(config.model.name)["vision_cfg"]
    size = config.model.image_size or vision["image_size"]
    image_size = (size, size) if isinstance(size, int) else tuple(size)
    normalization = (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    tokenizer = open_clip.get_tokenizer(config.model.name)
    stream = build_train_stream(config.data, image_size, normalization, tokenizer, LOCAL_BATCH, rank=0, world_size=1,
                                seed=0, crop_source_scale=config.losses.crop_source_scale)
    return stream, image_size, config


@pytest.mark.parametrize("recipe, overrides", CASES, ids=[f"{r}{'+' + ','.join(o) if o else ''}" for r, o in CASES])
def test_samples_per_second_of_one_worker(benchmark, shard, recipe, overrides):
    torch.set_num_threads(1)  # a DataLoader worker runs torch on one thread
    stream, image_size, config = _stream(recipe, overrides, shard)
    batches = iter(stream)
    next(batches)  # warm-up: the tokenizer's caches, the first tar open

    def load() -> int:
        return sum(len(next(batches)["images"]) for _ in range(BATCHES))

    started = time.perf_counter()
    samples = benchmark.pedantic(load, rounds=5, iterations=1)
    per_second = BATCHES * LOCAL_BATCH / benchmark.stats.stats.min  # the best round: other processes only slow it
    benchmark.extra_info.update({"device": "cpu, 1 thread", "recipe": recipe, "overrides": overrides,
                                 "image_size": list(image_size), "max_boxes": config.data.max_boxes,
                                 "samples_per_s": round(per_second, 1)})
    print(f"\n{recipe} {' '.join(overrides)}: {image_size[0]}x{image_size[1]} px, max_boxes "
          f"{config.data.max_boxes}: {per_second:.0f} samples/s per worker "
          f"({time.perf_counter() - started:.1f} s)")
    assert samples == BATCHES * LOCAL_BATCH
