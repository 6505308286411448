"""The training-format webdataset record (bytes by extension), both ways: encoding one, and decoding one
into a TransformedSample or the reason it was skipped."""
from __future__ import annotations

import io
import json
from collections import Counter
from typing import Any

from PIL import Image

from fineclip_ds.data.collate import TransformedSample
from fineclip_ds.data.images import open_image
from fineclip_ds.data.transforms import RegionTransform

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def image_key(record: dict[str, Any]) -> str | None:
    """The record's image extension (jpg, jpeg, png or webp), None when it has no image."""
    return next((ext for ext in IMAGE_EXTENSIONS if ext in record), None)


def encode_record(key: str, image: Image.Image, caption: str, boxes: list, region_captions: list[str],
                  quality: int) -> dict[str, Any]:
    """One training-format record: the image as JPEG, its caption, and the boxes with their region captions."""
    encoded = io.BytesIO()
    image.save(encoded, format="JPEG", quality=quality)
    annotation = {"boxes": boxes, "region_captions": region_captions}
    return {"__key__": key, "jpg": encoded.getvalue(), "txt": caption, "json": json.dumps(annotation)}


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_record(record: dict[str, Any], transform: RegionTransform) -> tuple[TransformedSample | None, Counter]:
    """Training-format record (image, txt caption, json {boxes, region_captions}) -> sample and drops.

    A record that cannot be used returns None with one count under its reason; boxes that cannot be
    used are dropped from the sample and counted by the transform.
    """
    extension = image_key(record)
    if extension is None:
        return None, Counter(missing_image=1)
    if "txt" not in record:
        return None, Counter(missing_caption=1)
    try:
        annotation = json.loads(_text(record["json"])) if "json" in record else {"boxes": [], "region_captions": []}
        boxes, region_captions = annotation["boxes"], annotation["region_captions"]
        if not isinstance(boxes, list) or not isinstance(region_captions, list) or len(boxes) != len(region_captions):
            raise ValueError("boxes and region_captions must be lists of equal length")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None, Counter(bad_json=1)
    image = open_image(lambda: Image.open(io.BytesIO(record[extension])))
    if image is None:
        return None, Counter(corrupt_image=1)
    tensor, kept_boxes, kept_index, drops = transform(image, boxes)
    sample = TransformedSample(tensor, _text(record["txt"]).strip(), kept_boxes,
                               [str(region_captions[i]) for i in kept_index], drops)
    return sample, Counter()
