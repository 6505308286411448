"""Where an image's regions and their captions come from: proposals captioned by a vision-language
model, or FineCLIP's released files (COCO-format proposals + region captions keyed by box).

An annotator maps several (image, key) at once to their [(xyxy box, caption)] lists, counting what it
drops in `counts`: a captioner then sees the crops of all of them in its batches (one image has ~10
crops, far too few to keep a GPU busy decoding).
"""
from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Protocol

from PIL import Image

from fineclip_ds.data.captioner import Captioner, caption_regions
from fineclip_ds.data.coco import coco_xyxy, read_coco
from fineclip_ds.data.proposals import ProposalFilter, Proposer
from fineclip_ds.data.records import FileNameLookup
from fineclip_ds.data.transforms import validate_boxes

log = logging.getLogger("fineclip_ds")

Region = tuple[list[float], str]

# Images after which released region captions that matched no box key are warned about (the whole run if shorter).
KEY_CHECK_IMAGES = 20


class RegionAnnotator(Protocol):
    def __call__(self, images: list[Image.Image], keys: list[str], counts: Counter) -> list[list[Region]]: ...


class CaptionedProposals:
    """Proposals -> filter -> a caption for each region crop; empty or degenerate captions are dropped."""

    def __init__(self, proposer: Proposer, box_filter: ProposalFilter, captioner: Captioner, prompt: str = ""):
        self.proposer, self.box_filter, self.captioner, self.prompt = proposer, box_filter, captioner, prompt

    def __call__(self, images: list[Image.Image], keys: list[str], counts: Counter) -> list[list[Region]]:
        skipped = getattr(self.proposer, "skipped", None)  # e.g. the crowd boxes of a COCO file
        for key in keys if skipped else ():
            counts.update(skipped(key))
        boxes = [self.box_filter(self.proposer.propose(image, key), *image.size, counts)
                 for image, key in zip(images, keys)]
        counts["proposals"] += sum(len(image_boxes) for image_boxes in boxes)
        crops = [image.crop(_pixel_box(box)) for image, image_boxes in zip(images, boxes) for box in image_boxes]
        captions, drops = caption_regions(self.captioner, crops, self.prompt)  # every image's crops in one go
        counts.update(drops)
        regions, start = [], 0
        for image_boxes in boxes:
            image_captions = captions[start:start + len(image_boxes)]
            start += len(image_boxes)
            regions.append([(list(box), caption) for box, caption in zip(image_boxes, image_captions)
                            if caption is not None])
        return regions


def _pixel_box(box: list[float]) -> tuple[int, int, int, int]:
    """The pixels a box touches: never empty (rounding both ends can give a box under a pixel, or
    (1.5, 2.5) under round-half-to-even, no pixel, and a captioner's processor fails on an empty crop)."""
    left, top = math.floor(box[0]), math.floor(box[1])
    return left, top, max(math.ceil(box[2]), left + 1), max(math.ceil(box[3]), top + 1)


def released_region_key(file_name: str, bbox: list[float]) -> str:
    """FineCLIP's region-caption key: "{file_name}_{x}_{y}_{w}_{h}.jpg" with the COCO bbox truncated to ints
    (int(), toward zero: [10.7, 4.2, 20.5, 30.0] -> "_10_4_20_30.jpg")."""
    x, y, w, h = (int(v) for v in bbox)
    return f"{file_name}_{x}_{y}_{w}_{h}.jpg"


class ReleasedRegionCaptions:
    """FineCLIP's released data: boxes from a COCO-format proposals JSON, captions from its region-caption JSON.

    Boxes are kept when min_size^2 <= w*h <= max_size^2 (FineCLIP's own rule), at most `max_boxes` (0 or None:
    every box); a bad bbox is dropped and counted by validate_boxes' reasons (as the training loader would), a box
    without a caption (or with one that is not text) as caption_missing, an image the proposals JSON
    does not list as image_not_in_proposals. Images are found by the pair's key (`FileNameLookup`).
    Caption keys are `released_region_key`s; when none looked up in the first KEY_CHECK_IMAGES images
    (or the whole run: `warn_if_no_key_matched`) is in the file, one of each is shown in a warning.
    """

    def __init__(self, proposals_json: Path, region_captions_json: Path, min_size: float = 0.0,
                 max_size: float = float("inf"), max_boxes: int | None = None):
        names, annotations = read_coco(proposals_json)
        self.file_name = FileNameLookup(names.values())
        self.bboxes: dict[str, list[list[float]]] = defaultdict(list)
        for annotation in annotations:
            self.bboxes[names[annotation["image_id"]]].append(annotation.get("bbox"))
        self.captions: dict[str, str] = json.loads(Path(region_captions_json).read_text())
        if not isinstance(self.captions, dict):
            raise ValueError(f"{region_captions_json}: expected a JSON object {{region key: caption}}, got "
                             f"{type(self.captions).__name__}")
        self.region_captions_json = region_captions_json
        self.images_seen, self.keys_found, self.key_not_found, self.warned = 0, 0, None, False
        self.min_area, self.max_area, self.max_boxes = min_size ** 2, max_size ** 2, max_boxes

    def __call__(self, images: list[Image.Image], keys: list[str], counts: Counter) -> list[list[Region]]:
        regions = [self._regions(key, *image.size, counts) for image, key in zip(images, keys)]
        self.images_seen += len(images)
        if self.images_seen >= KEY_CHECK_IMAGES:
            self.warn_if_no_key_matched()
        return regions

    def warn_if_no_key_matched(self) -> None:
        """Once, when every caption key looked up so far is missing from the file: its keys are of another form
        (rounded coordinates, another file name), and every box would be dropped as caption_missing."""
        if self.warned or self.keys_found or self.key_not_found is None:
            return
        self.warned = True
        log.warning("%s: no region caption key of the %d images annotated so far is in the file; expected keys "
                    "like %r ({file_name}_{x}_{y}_{w}_{h}.jpg: the proposals' file name and COCO bbox truncated to "
                    "integers), the file has keys like %r", self.region_captions_json, self.images_seen,
                    self.key_not_found, next(iter(self.captions), None))

    def _regions(self, key: str, width: int, height: int, counts: Counter) -> list[Region]:
        regions: list[Region] = []
        file_name = self.file_name(key)
        if file_name is None:
            counts["image_not_in_proposals"] += 1
            return regions
        for bbox in self.bboxes[file_name]:
            counts["proposals"] += 1
            boxes, _, drops = validate_boxes([coco_xyxy(bbox)], width, height)
            if drops:
                counts.update(drops)
                continue
            x, y, w, h = bbox  # four finite numbers, w and h positive
            if not self.min_area <= w * h <= self.max_area or (self.max_boxes and len(regions) == self.max_boxes):
                counts["box_filtered"] += 1
                continue
            key = released_region_key(file_name, bbox)
            if key in self.captions:
                self.keys_found += 1
            elif self.key_not_found is None:
                self.key_not_found = key
            caption = self.captions.get(key)
            if not isinstance(caption, str) or not caption.strip():
                counts["caption_missing"] += 1
                continue
            regions.append((boxes[0], caption.strip()))
        return regions
