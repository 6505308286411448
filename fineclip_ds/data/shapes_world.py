"""The built-in region-text world: procedurally drawn coloured shapes with image and region captions.

It stands in for LVLM-captioned web data so that training, evaluation and the loss ablation run
offline and reproducibly. Every sample is a pure function of (world seed, index): any rank can draw
any index, and resuming needs only the step. Class = colour + shape, so a region caption names
exactly one class, while an image caption names several objects and not where they are, which is
the gap the regional losses are meant to close.

    python -m fineclip_ds.data.shapes_world --output_dir shards/ --num_samples 1000
writes the same samples as webdataset shards in the training format.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from fineclip_ds.config import non_negative_int, positive_int
from fineclip_ds.data.records import encode_record

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 170, 60),
    "blue": (40, 75, 215),
    "yellow": (240, 215, 30),
    "purple": (135, 50, 185),
    "cyan": (30, 200, 210),
}
SHAPES = ("circle", "square", "triangle", "diamond")
EVAL_INDEX_OFFSET = 1 << 40  # held-out samples: indices training never reaches
IGNORE_LABEL = 255  # background pixels in label maps: no class, not scored
MAX_PLACEMENT_OVERLAP = 0.3


@dataclass
class RegionSample:
    image: Image.Image
    caption: str
    boxes: list[list[float]]  # x1, y1, x2, y2 in image pixels
    region_captions: list[str]
    labels: list[int]  # class index of each box, into ShapesWorld.classes
    label_map: Image.Image  # "L" mode: class index per pixel, IGNORE_LABEL for background


def _iou(a: list[float], b: list[float]) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


class ShapesWorld:
    """Deterministic, endless source of RegionSamples; `sample(i)` for training, `eval_sample(i)` held out."""

    def __init__(self, seed: int = 0, image_size: int = 128, max_objects: int = 4):
        self.seed = seed
        self.image_size = image_size
        self.max_objects = max_objects
        self.classes = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]

    def eval_sample(self, index: int) -> RegionSample:
        return self.sample(EVAL_INDEX_OFFSET + index)

    def sample(self, index: int) -> RegionSample:
        rng = np.random.default_rng([self.seed, index])
        image = Image.fromarray(self._background(rng))
        label_map = Image.new("L", image.size, IGNORE_LABEL)
        draw, draw_labels = ImageDraw.Draw(image), ImageDraw.Draw(label_map)
        boxes: list[list[float]] = []
        labels: list[int] = []
        for _ in range(int(rng.integers(1, self.max_objects + 1))):
            box = self._place(rng, boxes)
            if box is None:
                break
            label = int(rng.integers(len(self.classes)))
            colour, shape = self.classes[label].split(" ")
            self._draw(draw, shape, box, COLOURS[colour])
            self._draw(draw_labels, shape, box, label)  # same geometry: later objects cover earlier ones
            boxes.append(box)
            labels.append(label)
        region_captions = [f"a {self.classes[label]}" for label in labels]
        caption = f"a photo of {_join(region_captions)}"
        return RegionSample(image, caption, boxes, region_captions, labels, label_map)

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """A low-saturation gradient with noise, so that shapes are the only saturated colours."""
        size = self.image_size
        start, end = rng.uniform(60, 190, size=(2, 1, 1, 1))
        ramp = np.linspace(0, 1, size)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, size)[:, None, None]
        base = start + (end - start) * ramp + rng.uniform(-12, 12, size=(1, 1, 3))
        noise = rng.normal(0, 10, size=(size, size, 3))
        return np.clip(base + noise, 0, 255).astype(np.uint8)

    def _place(self, rng: np.random.Generator, taken: list[list[float]]) -> list[float] | None:
        size = self.image_size
        for _ in range(20):
            side = rng.uniform(0.18, 0.45) * size
            aspect = rng.uniform(0.8, 1.25)
            width, height = side * aspect, side / aspect
            x1, y1 = rng.uniform(0, size - width), rng.uniform(0, size - height)
            box = [float(x1), float(y1), float(x1 + width), float(y1 + height)]
            if all(_iou(box, other) <= MAX_PLACEMENT_OVERLAP for other in taken):
                return box
        return None

    @staticmethod
    def _draw(draw: ImageDraw.ImageDraw, shape: str, box: list[float], colour: tuple[int, int, int] | int) -> None:
        x1, y1, x2, y2 = box
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        if shape == "circle":
            draw.ellipse(box, fill=colour)
        elif shape == "square":
            draw.rectangle(box, fill=colour)
        elif shape == "triangle":
            draw.polygon([(cx, y1), (x2, y2), (x1, y2)], fill=colour)
        else:
            draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=colour)


def encode_training_sample(key: str, sample: RegionSample) -> dict[str, object]:
    """One webdataset record in the training format: image, caption, boxes, region_captions."""
    return encode_record(key, sample.image, sample.caption, sample.boxes, sample.region_captions, quality=92)


def write_shards(world: ShapesWorld, output_dir: Path, num_samples: int, samples_per_shard: int = 256,
                 start_index: int = 0) -> list[Path]:
    """Write samples start_index.. as shards-000000.tar, ...; returns the shard paths."""
    import webdataset as wds

    output_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    progress = tqdm(total=num_samples, desc="shapes world -> shards", unit="img")
    for shard_start in range(0, num_samples, samples_per_shard):
        path = output_dir / f"shards-{len(paths):06d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for offset in range(shard_start, min(shard_start + samples_per_shard, num_samples)):
                index = start_index + offset
                writer.write(encode_training_sample(f"{index:012d}", world.sample(index)))
                progress.update()
        paths.append(path)
    progress.close()
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--num_samples", type=positive_int, default=1024)
    parser.add_argument("--samples_per_shard", type=positive_int, default=256)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--image_size", type=positive_int, default=128)
    args = parser.parse_args()
    paths = write_shards(ShapesWorld(args.seed, args.image_size), args.output_dir, args.num_samples, args.samples_per_shard)
    print(f"wrote {args.num_samples} samples to {len(paths)} shards in {args.output_dir}")


if __name__ == "__main__":
    main()
