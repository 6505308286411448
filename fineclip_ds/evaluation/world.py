"""Evaluation on the built-in world's held-out split: what periodic evaluation and the ablation report."""
from __future__ import annotations

from collections import Counter
from typing import Callable

import torch

from fineclip_ds.data.shapes_world import ShapesWorld
from fineclip_ds.evaluation.box_classification import BoxDataset, BoxImage, evaluate_box_classification
from fineclip_ds.evaluation.retrieval import CaptionedImage, evaluate_retrieval
from fineclip_ds.evaluation.segmentation import LabelledImage, evaluate_segmentation
from fineclip_ds.models.fineclip import FineCLIP


SEGMENTATION_IMAGES = 64  # background is unscored; 64 images hold every class many times over


def world_box_dataset(world: ShapesWorld, images: int) -> BoxDataset:
    samples = [world.eval_sample(index) for index in range(images)]
    return BoxDataset(list(world.classes), [
        BoxImage(lambda sample=sample: sample.image, sample.boxes, sample.labels, f"eval-{index}")
        for index, sample in enumerate(samples)
    ])


def world_caption_items(world: ShapesWorld, images: int) -> list[CaptionedImage]:
    """Held-out images whose caption is unique in the set: a caption shared by two images has no single
    right answer, and ties count against the model."""
    samples = [world.eval_sample(index) for index in range(images)]
    counts = Counter(sample.caption for sample in samples)
    return [CaptionedImage(lambda sample=sample: sample.image, [sample.caption])
            for sample in samples if counts[sample.caption] == 1]


def evaluate_on_world(model: FineCLIP, tokenizer: Callable[[list[str]], torch.Tensor], normalization: tuple,
                      world: ShapesWorld, images: int = 256, batch_size: int = 32, device: torch.device | str = "cpu",
                      crop_baseline: bool = False, dtype: torch.dtype = torch.float32,
                      progress: bool = False) -> dict[str, float]:
    """Box classification (per-class mean top-1/top-5 over the world's colour+shape classes), retrieval,
    and zero-shot segmentation of the shapes (mIoU; background pixels unscored)."""
    boxes = evaluate_box_classification(model, tokenizer, normalization, world_box_dataset(world, images), "shapes",
                                        batch_size, crop_baseline, device, dtype, progress)
    retrieval = evaluate_retrieval(model, tokenizer, normalization, world_caption_items(world, images), batch_size,
                                   device, dtype, progress)
    samples = [world.eval_sample(index) for index in range(min(images, SEGMENTATION_IMAGES))]
    segmentation = evaluate_segmentation(
        model, tokenizer, normalization, list(world.classes),
        [LabelledImage(lambda s=sample: s.image, lambda s=sample: s.label_map) for sample in samples],
        "shapes", device=device, dtype=dtype, progress=progress)
    results = {"box_top1": boxes["region_top1"], "box_top5": boxes["region_top5"],
               "seg_miou": segmentation["miou"], "seg_pixel_accuracy": segmentation["pixel_accuracy"]}
    if crop_baseline:
        results.update({"crop_top1": boxes["crop_top1"], "crop_top5": boxes["crop_top5"]})
    results.update({key: value for key, value in retrieval.items() if key.startswith(("i2t", "t2i"))})
    return results
