"""Small data the data tests build: a character-count tokenizer and shard writing with defects."""
from __future__ import annotations

import io
import json
from pathlib import Path

import torch
import webdataset as wds

from fineclip_ds.data.shapes_world import ShapesWorld, encode_training_sample

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def length_tokenizer(texts: list[str]) -> torch.Tensor:
    """Stands in for a real tokenizer: one token per text, its length, so captions can be checked."""
    return torch.tensor([[len(text)] for text in texts])


def write_shard(path: Path, records: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    return path


def with_image_written_twice(record: dict) -> list[dict]:
    """The record as a writer that wrote its image twice leaves it: two adjacent `<key>.jpg` members."""
    return [{"__key__": record["__key__"], "jpg": record["jpg"]}, record]


def world_records(world: ShapesWorld, indices: range) -> list[dict]:
    return [encode_training_sample(f"{index:06d}", world.sample(index)) for index in indices]


def defective_records() -> list[dict]:
    """One record per way a real shard goes wrong; each must be skipped or trimmed, and counted."""
    good_image = io.BytesIO()
    ShapesWorld(image_size=32).sample(0).image.save(good_image, format="PNG")
    good = good_image.getvalue()
    annotation = json.dumps({"boxes": [[1, 1, 10, 10]], "region_captions": ["a box"]})
    return [
        {"__key__": "corrupt", "jpg": b"\xff\xd8 not really a jpeg", "txt": "x", "json": annotation},
        {"__key__": "noimage", "txt": "x", "json": annotation},
        {"__key__": "badjson", "png": good, "txt": "x", "json": "{not json"},
        {"__key__": "mismatch", "png": good, "txt": "x", "json": json.dumps({"boxes": [[1, 1, 5, 5]], "region_captions": []})},
        {"__key__": "badboxes", "png": good, "txt": "bad boxes", "json": json.dumps({
            "boxes": [[5, 5, 2, 9], [40, 40, 50, 50], [1, 1, 1.01, 9], [float("nan"), 0, 3, 3], [2, 2, 20, 20]],
            "region_captions": ["non-positive", "outside", "too small", "nan", "kept"],
        })},
    ]


CAPTION_CHARS = 160


def char_tokenizer(texts: list[str]) -> torch.Tensor:
    """Reversible stand-in tokenizer (character codes, zero padded) so tests can read captions back."""
    tokens = torch.zeros(len(texts), CAPTION_CHARS, dtype=torch.long)
    for row, text in enumerate(texts):
        codes = [ord(c) for c in text[:CAPTION_CHARS]]
        tokens[row, :len(codes)] = torch.tensor(codes, dtype=torch.long)
    return tokens


def captions(tokens: torch.Tensor) -> list[str]:
    return ["".join(chr(c) for c in row.tolist() if c) for row in tokens]
