"""A list of transformed samples -> one padded batch, with the data counters it carries."""
from __future__ import annotations

import dataclasses
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class TransformedSample:
    image: torch.Tensor  # [3, H, W] normalised, at the model's input size
    caption: str
    boxes: torch.Tensor  # [k, 4] xyxy pixels at H x W
    region_captions: list[str]  # k, aligned with boxes
    drops: Counter = field(default_factory=Counter)  # boxes and samples dropped on the way here
    crop_source: torch.Tensor | None = None  # [3, s*H, s*W]: the image teacher crops are cut from (s > 1)


def pick_boxes(sample: TransformedSample, max_boxes: int, seed: str) -> TransformedSample:
    """At most `max_boxes` of the sample's boxes, picked at random as FineCLIP's loader picks them each
    time an image is read (the first `max_boxes` every epoch would never train on the rest). `seed`
    names the read (seed, epoch, shard, key), so a resume picks the same boxes; the others are counted
    under box_over_max."""
    extra = len(sample.boxes) - max_boxes
    if extra <= 0:
        return sample
    chosen = sorted(random.Random(seed).sample(range(len(sample.boxes)), max_boxes))
    return dataclasses.replace(sample, boxes=sample.boxes[chosen],
                               region_captions=[sample.region_captions[index] for index in chosen],
                               drops=sample.drops + Counter(box_over_max=extra))


class RegionCollator:
    """Pads boxes to the batch's largest count (at most `max_boxes`) and tokenises every caption.

    Boxes beyond `max_boxes` are dropped and counted ("box_over_max"): the last ones, where a stream has
    not already picked `max_boxes` at random (`pick_boxes`, as webdataset streams do). `data_stats` carries the
    counts of everything dropped since the previous batch, plus the samples and regions kept.
    """

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor], max_boxes: int):
        if max_boxes < 1:
            raise ValueError(f"max_boxes={max_boxes}: expected at least 1")
        self.tokenizer = tokenizer
        self.max_boxes = max_boxes

    def __call__(self, samples: list[TransformedSample]) -> dict[str, object]:
        stats: Counter = Counter()
        for sample in samples:
            stats.update(sample.drops)
            stats["box_over_max"] += max(0, len(sample.boxes) - self.max_boxes)
        counts = [min(len(sample.boxes), self.max_boxes) for sample in samples]
        slots = max(1, max(counts))
        boxes = torch.zeros(len(samples), slots, 4)
        box_mask = torch.zeros(len(samples), slots, dtype=torch.bool)
        region_captions = [[""] * slots for _ in samples]
        for row, (sample, count) in enumerate(zip(samples, counts)):
            boxes[row, :count] = sample.boxes[:count]
            box_mask[row, :count] = True
            region_captions[row][:count] = sample.region_captions[:count]
        texts = self.tokenizer([sample.caption for sample in samples])
        region_texts = self.tokenizer([caption for row in region_captions for caption in row])
        stats["samples"] += len(samples)
        stats["regions"] += sum(counts)
        batch = {
            "images": torch.stack([sample.image for sample in samples]),
            "texts": texts,
            "boxes": boxes,
            "box_mask": box_mask,
            "region_texts": region_texts.view(len(samples), slots, -1),
            "data_stats": dict(+stats),  # a plain dict: DataLoader conversion would re-add a Counter into itself
        }
        if samples[0].crop_source is not None:
            batch["crop_images"] = torch.stack([sample.crop_source for sample in samples])
        return batch
