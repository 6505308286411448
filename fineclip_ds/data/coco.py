"""Reading COCO-format JSON (captions, instances, panoptic, FineCLIP's proposals): the image list and the
annotations, with a clear error when a file is not one. One set of rules for every reader: an annotation
of no listed image is skipped and counted, a bad box is named by validate_boxes' reasons."""
from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any, Hashable

from fineclip_ds.data.transforms import as_number, validate_boxes

log = logging.getLogger("fineclip_ds")


def load_coco_json(path: Path) -> dict[str, Any]:
    """The parsed file, refused unless it is an object with lists 'images' and 'annotations'."""
    coco = json.loads(Path(path).read_text())
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list) or not isinstance(
            coco.get("annotations"), list):
        found = sorted(coco) if isinstance(coco, dict) else type(coco).__name__
        raise ValueError(f"{path}: expected a COCO-format JSON object with lists 'images' and 'annotations', "
                         f"got {found}")
    return coco


def image_names(coco: dict[str, Any], path: Path) -> dict[Any, str]:
    """image id -> file_name; an image entry without both names the file and the entry (nothing can be read
    without it), and so does an id listed again with another file name (whose image its annotations are is lost)."""
    names: dict[Any, str] = {}
    for index, image in enumerate(coco["images"]):
        if not isinstance(image, dict) or not isinstance(image.get("id"), Hashable) or not isinstance(
                image.get("file_name"), str):  # a JSON list or object is no id
            raise ValueError(f"{path}: images[{index}] = {image!r:.200}; expected an object with 'id' and a "
                             "'file_name' string")
        if names.get(image["id"], image["file_name"]) != image["file_name"]:
            # the later entry would win: the earlier image's annotations read onto the later one's pixels
            raise ValueError(f"{path}: image id {image['id']!r} is listed twice, as {names[image['id']]!r} and "
                             f"{image['file_name']!r}; expected one file per id")
        names[image["id"]] = image["file_name"]
    return names


def stray_annotation_reason(annotation: Any, names: dict[Any, str]) -> str | None:
    """Why an annotation belongs to no listed image ('annotation_not_an_object', 'unknown_image'), else None."""
    if not isinstance(annotation, dict):
        return "annotation_not_an_object"
    image_id = annotation.get("image_id")
    if not isinstance(image_id, Hashable) or image_id not in names:  # a JSON list or object is no id
        return "unknown_image"
    return None


def images_annotations(coco: dict[str, Any], path: Path) -> tuple[dict[Any, str], list[dict[str, Any]], Counter]:
    """(image id -> file_name, the annotations of listed images, the others counted by reason)."""
    names = image_names(coco, path)
    kept, skipped = [], Counter()
    for annotation in coco["annotations"]:
        reason = stray_annotation_reason(annotation, names)
        if reason is None:
            kept.append(annotation)
        else:
            skipped[reason] += 1
    return names, kept, skipped


def coco_xyxy(bbox: Any) -> Any:
    """COCO [x, y, w, h] -> (x1, y1, x2, y2); a bbox that is not four numbers (a string, null, three
    values) comes back as it is, for validate_boxes to drop and count."""
    values = [as_number(v) for v in bbox] if isinstance(bbox, (list, tuple)) and len(bbox) == 4 else [None]
    if None in values:
        return bbox
    x, y, w, h = values
    return (x, y, x + w, y + h)


def coco_box(bbox: Any) -> tuple[list[float] | None, str | None]:
    """COCO [x, y, w, h] as ([x1, y1, x2, y2], None), or (None, reason) by validate_boxes' reasons
    (box_malformed, box_not_finite, box_non_positive, ...): a box is judged as the training loader judges it,
    before the image (and so its size) is known."""
    xyxy = coco_xyxy(bbox)
    _, _, drops = validate_boxes([xyxy], math.inf, math.inf)
    return (None, next(iter(drops))) if drops else (list(xyxy), None)


def read_coco(path: Path) -> tuple[dict[Any, str], list[dict[str, Any]]]:
    """(image id -> file_name, annotations whose image_id the file lists). An annotation naming an image
    the file does not list belongs to no image: it is dropped with a warning naming the count."""
    coco = load_coco_json(path)
    names, annotations, skipped = images_annotations(coco, path)
    if skipped:
        log.warning("%s: %d of %d annotations name no image the file lists (or are not objects); skipped", path,
                    len(coco["annotations"]) - len(annotations), len(coco["annotations"]))
    return names, annotations
