"""Reading COCO-format JSON (captions, instances, FineCLIP's proposals): the image list and the annotations,
with a clear error when a file is not one."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("fineclip_ds")


def read_coco(path: Path) -> tuple[dict[Any, str], list[dict[str, Any]]]:
    """(image id -> file_name, annotations whose image_id the file lists). An annotation naming an image
    the file does not list belongs to no image: it is dropped with a warning naming the count."""
    coco = json.loads(Path(path).read_text())
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list) or not isinstance(
            coco.get("annotations"), list):
        found = sorted(coco) if isinstance(coco, dict) else type(coco).__name__
        raise ValueError(f"{path}: expected a COCO-format JSON object with lists 'images' and 'annotations', "
                         f"got {found}")
    names: dict[Any, str] = {}
    for index, image in enumerate(coco["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise ValueError(f"{path}: images[{index}] = {image!r:.200}; expected an object with 'id' and a "
                             "'file_name' string")
        names[image["id"]] = image["file_name"]
    annotations = [a for a in coco["annotations"] if isinstance(a, dict) and a.get("image_id") in names]
    if len(annotations) < len(coco["annotations"]):
        log.warning("%s: %d of %d annotations name no image the file lists (or are not objects); skipped", path,
                    len(coco["annotations"]) - len(annotations), len(coco["annotations"]))
    return names, annotations
