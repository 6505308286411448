"""The training-format webdataset record (bytes by extension), both ways: encoding one, and decoding one
into a TransformedSample or the reason it was skipped."""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from fineclip_ds.data.collate import TransformedSample
from fineclip_ds.data.images import open_image
from fineclip_ds.data.transforms import RegionTransform

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def image_key(record: dict[str, Any]) -> str | None:
    """The record's image extension (jpg, jpeg, png or webp), None when it has no image."""
    return next((ext for ext in IMAGE_EXTENSIONS if ext in record), None)


def record_key(name: str) -> str:
    """A webdataset key from an input name: webdataset splits a member name at its first dot, so
    "000123.jpg" written as a key would turn the record's "jpg" into "jpg.jpg"; drop the image
    extension and replace the remaining dots."""
    stem, dot, extension = name.rpartition(".")
    if dot and extension.lower() in IMAGE_EXTENSIONS:
        name = stem
    return name.replace(".", "_")


class FileNameLookup:
    """The file name an annotation JSON uses for an input pair's key. Keys are file names (image
    folders, COCO caption files), paths ending in one, or, for webdataset shards, the `record_key`
    made of one ("000000000139.jpg" -> "000000000139"); all three find the JSON's name."""

    def __init__(self, file_names: Iterable[str]):
        self.names: dict[str, str] = {}
        for name in file_names:
            for alias in (name, Path(name).name, record_key(Path(name).name)):
                self.names.setdefault(alias, name)

    def __call__(self, key: str) -> str | None:
        return self.names.get(key) or self.names.get(Path(key).name)


def encode_record(key: str, image: Image.Image, caption: str, boxes: list, region_captions: list[str],
                  quality: int) -> dict[str, Any]:
    """One training-format record: the image as JPEG, its caption, and the boxes with their region captions."""
    encoded = io.BytesIO()
    image.save(encoded, format="JPEG", quality=quality)
    annotation = {"boxes": boxes, "region_captions": region_captions}
    return {"__key__": key, "jpg": encoded.getvalue(), "txt": caption, "json": json.dumps(annotation)}


def _text(value: Any) -> str:
    """UTF-8 text without the byte-order mark some editors write first (json.loads refuses it)."""
    return (value.decode("utf-8") if isinstance(value, bytes) else str(value)).removeprefix("\ufeff")


def decode_caption(value: Any) -> str | None:
    """A record's caption, stripped; None when its bytes are not UTF-8 or nothing is left."""
    try:
        return _text(value).strip() or None
    except UnicodeDecodeError:
        return None


def decode_record(record: dict[str, Any], transform: RegionTransform) -> tuple[TransformedSample | None, Counter]:
    """Training-format record (image, txt caption, json {boxes, region_captions}) -> sample and drops.

    A record that cannot be used returns None with one count under its reason; boxes that cannot be
    used (bad coordinates, or an empty region caption) are dropped from the sample and counted. A record
    without `json` trains the global loss only and is counted (no_region_json): under another member
    name (`regions.json`) a whole data set would otherwise train as plain CLIP without a word.
    """
    extension = image_key(record)
    if extension is None:
        return None, Counter(missing_image=1)
    if "txt" not in record:
        return None, Counter(missing_caption=1)
    caption = decode_caption(record["txt"])
    if caption is None:
        return None, Counter(bad_caption=1)
    try:
        annotation = json.loads(_text(record["json"])) if "json" in record else {"boxes": [], "region_captions": []}
        boxes, region_captions = annotation["boxes"], annotation["region_captions"]
        if not isinstance(boxes, list) or not isinstance(region_captions, list):
            raise ValueError("boxes and region_captions must be lists")
        if not all(isinstance(region_caption, str) for region_caption in region_captions):
            raise ValueError("region_captions must be strings")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):  # RecursionError: absurd nesting
        return None, Counter(bad_json=1)
    if len(boxes) != len(region_captions):  # well-formed, but which caption belongs to which box is lost
        return None, Counter(region_captions_mismatch=1)
    image = open_image(lambda: Image.open(io.BytesIO(record[extension])))
    if image is None:
        return None, Counter(corrupt_image=1)
    tensor, kept_boxes, kept_index, drops = transform(image, boxes)
    if "json" not in record:
        drops["no_region_json"] += 1
    captioned = [row for row, index in enumerate(kept_index) if region_captions[index].strip()]
    if len(captioned) < len(kept_index):
        drops["region_caption_empty"] += len(kept_index) - len(captioned)
    sample = TransformedSample(tensor, caption, kept_boxes[captioned],
                               [region_captions[kept_index[row]].strip() for row in captioned], drops,
                               transform.crop_source(image))
    return sample, Counter()
