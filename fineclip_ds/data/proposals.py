"""Region proposals for the region-text pipeline: pluggable sources, one filter.

Sources: ground-truth boxes from a COCO instances JSON, a torchvision detector loaded from a local
weights file, or a weight-free grid (for tests and smoke runs). Every source returns scored xyxy
pixel boxes; `ProposalFilter` drops and counts bad boxes and scores (as the training loader does), then
applies size limits, a score threshold, NMS and a cap.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from torchvision.ops import nms
from torchvision.transforms import functional as TF

from fineclip_ds.data.coco import coco_xyxy, read_coco
from fineclip_ds.data.records import FileNameLookup
from fineclip_ds.data.transforms import as_number, validate_boxes
from fineclip_ds.usage_errors import first_lines

Box = tuple[float, float, float, float]


def proposal_score(value: Any) -> float | None:
    """A proposal's score as a float; None when it is not a finite number (null, a string, NaN)."""
    score = as_number(value)
    return score if score is not None and math.isfinite(score) else None


class Proposer(Protocol):
    def propose(self, image: Image.Image, key: str) -> list[tuple[Box, float]]: ...


class GridProposer:
    """Weight-free: the whole image's quadrants and centre at two scales. Deterministic."""

    def propose(self, image: Image.Image, key: str) -> list[tuple[Box, float]]:
        width, height = image.size
        boxes: list[tuple[Box, float]] = []
        for cells in (2, 3):
            step_x, step_y = width / cells, height / cells
            for row in range(cells):
                for column in range(cells):
                    boxes.append(((column * step_x, row * step_y, (column + 1) * step_x, (row + 1) * step_y), 1.0 / cells))
        boxes.append(((width / 4, height / 4, 3 * width / 4, 3 * height / 4), 1.0))
        return boxes


class CocoBoxProposer:
    """Boxes of a COCO instances/proposals JSON (its score, else 1), found by the pair's key (`FileNameLookup`)."""

    def __init__(self, annotation_file: Path):
        names, annotations = read_coco(annotation_file)
        self.file_name = FileNameLookup(names.values())
        self.boxes: dict[str, list[tuple[Box, float]]] = defaultdict(list)
        self.crowd: Counter = Counter()  # file name -> crowd boxes left out (counted per image as crowd_box)
        for annotation in annotations:
            if annotation.get("iscrowd", 0):
                self.crowd[names[annotation["image_id"]]] += 1
                continue
            bbox = coco_xyxy(annotation.get("bbox"))  # a bad one is counted by ProposalFilter, per image
            self.boxes[names[annotation["image_id"]]].append((bbox, annotation.get("score", 1.0)))

    def propose(self, image: Image.Image, key: str) -> list[tuple[Box, float]]:
        return list(self.boxes.get(self.file_name(key), []))

    def skipped(self, key: str) -> Counter:
        """What the file holds for this image but `propose` leaves out, by reason."""
        crowd = self.crowd.get(self.file_name(key), 0)
        return Counter(crowd_box=crowd) if crowd else Counter()


class DetectorMismatch(ValueError):
    """The weights file does not fit the detector built (another architecture, or another number of classes)."""


class DetectorProposer:
    """A torchvision detector (fasterrcnn_*, retinanet_*) from a local state-dict file; class-agnostic boxes.

    The detector's own score cut is disabled: ProposalFilter applies the one threshold.
    """

    def __init__(self, weights: Path, architecture: str = "fasterrcnn_resnet50_fpn", num_classes: int = 91,
                 device: str | None = None):
        from torchvision.models import get_model

        no_score_cut = {"score_thresh": 0.0} if architecture.startswith("retinanet") else {"box_score_thresh": 0.0}
        self.model = get_model(architecture, weights=None, weights_backbone=None, num_classes=num_classes, **no_score_cut)
        try:
            self.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        except RuntimeError as error:  # torch's message lists every mismatched key: its first two lines say enough
            raise DetectorMismatch(first_lines(error)) from error
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.eval().to(self.device)

    @torch.no_grad()
    def propose(self, image: Image.Image, key: str) -> list[tuple[Box, float]]:
        output = self.model([TF.to_tensor(image.convert("RGB")).to(self.device)])[0]
        return [(tuple(box.tolist()), float(score)) for box, score in zip(output["boxes"].cpu(), output["scores"].cpu())]


@dataclass
class ProposalFilter:
    min_side: float = 0.05  # fraction of the image's shorter side
    max_area: float = 0.9  # fraction of the image's area
    score_threshold: float = 0.0
    nms_iou: float = 0.7
    max_boxes: int = 10  # 0: no limit, as for ReleasedRegionCaptions

    def __call__(self, proposals: list[tuple[Box, float]], width: int, height: int, counts: Counter) -> list[Box]:
        """Drop bad boxes and scores (counted in `counts` by reason), clip to the image, drop too small / too
        large / low-score boxes, NMS, keep the best `max_boxes` (all of them for 0)."""
        boxes, kept_index, drops = validate_boxes([box for box, _ in proposals], width, height)
        counts.update(drops)
        kept: list[tuple[Box, float]] = []
        for (x1, y1, x2, y2), index in zip(boxes, kept_index):
            score = proposal_score(proposals[index][1])
            if score is None:
                counts["proposal_bad_score"] += 1
                continue
            side = min(x2 - x1, y2 - y1)
            if side < self.min_side * min(width, height):
                counts["proposal_too_small"] += 1
                continue
            if (x2 - x1) * (y2 - y1) > self.max_area * width * height:
                counts["proposal_too_large"] += 1
                continue
            if score < self.score_threshold:
                counts["proposal_low_score"] += 1
                continue
            kept.append(((x1, y1, x2, y2), score))
        if not kept:
            return []
        boxes = torch.tensor([box for box, _ in kept], dtype=torch.float32)
        scores = torch.tensor([score for _, score in kept], dtype=torch.float32)
        survivors = nms(boxes, scores, self.nms_iou)
        order = survivors[: self.max_boxes or None]
        counts.update(+Counter(proposal_suppressed_nms=len(kept) - len(survivors),
                               proposal_over_max_boxes=len(survivors) - len(order)))
        return [tuple(boxes[i].tolist()) for i in order]
