"""Zero-shot box classification: RoIAlign region features of ground-truth boxes against class-name
embeddings, the same region path as training; plus the crop baseline (global embedding of each box crop,
cut from the image at its own resolution)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Iterator, Sequence

import torch
from PIL import Image
from torchvision.transforms import functional as TF
from tqdm import tqdm

from fineclip_ds.data.coco import coco_box, images_annotations, load_coco_json
from fineclip_ds.data.images import open_image, to_rgb
from fineclip_ds.data.transforms import RegionTransform
from fineclip_ds.evaluation.metrics import box_classification_metrics
from fineclip_ds.evaluation.zero_shot import class_embeddings
from fineclip_ds.models.fineclip import FineCLIP
from fineclip_ds.models.regions import crop_regions


@dataclass
class BoxImage:
    image: Callable[[], Image.Image]  # opened lazily: a folder of images never sits in memory at once
    boxes: list[list[float]]  # xyxy pixels
    labels: list[int]  # contiguous class indices
    name: str = ""


@dataclass
class BoxDataset:
    class_names: list[str]
    images: list[BoxImage]
    skipped: Counter = field(default_factory=Counter)


def load_coco_boxes(annotation_file: Path, image_dir: Path, keep_crowd: bool = False,
                    min_box_size: float = 0.0) -> BoxDataset:
    """COCO instances (bbox per annotation) or panoptic (segments_info per image); crowd boxes are
    skipped unless `keep_crowd`, boxes with w * h < min_box_size^2 always; an annotation of an unlisted
    image or a box that is not four finite numbers of positive size is skipped too (all counted by reason,
    with the reader make_regions uses: fineclip_ds.data.coco).

    FineCLIP's own evaluation (panoptic val2017) keeps crowd segments and drops w * h < 8^2:
    `keep_crowd=True, min_box_size=8` gives numbers comparable with the paper's tables."""
    coco = load_coco_json(annotation_file)
    if "categories" not in coco:
        raise ValueError(f"{annotation_file}: expected a COCO instances or panoptic JSON (with images, annotations "
                         "and categories; a captions file has no categories)")
    categories = _categories_by_id(coco["categories"], annotation_file)
    names, annotations, skipped = images_annotations(coco, annotation_file)
    dataset = _parse_coco(names, annotations, categories, Path(image_dir), keep_crowd, min_box_size)
    dataset.skipped.update(skipped)
    return dataset


def _categories_by_id(categories: object, annotation_file: Path) -> dict[object, str]:
    """category id -> name, in id order. A category id listed twice is refused: which name a box of that id
    would be scored against depends on the order of the list, and the scores change silently."""
    if not isinstance(categories, list) or not categories:  # [] failed in open_clip, after the model loaded
        raise ValueError(f"{annotation_file}: 'categories' = {categories!r:.200}; expected a non-empty list")
    names: dict[object, str] = {}
    for index, category in enumerate(categories):
        if not isinstance(category, dict) or not isinstance(category.get("id"), int) or not isinstance(
                category.get("name"), str):
            raise ValueError(f"{annotation_file}: categories[{index}] = {category!r:.200}; expected an object with "
                             "an integer 'id' and a 'name' string")
        if category["id"] in names:
            raise ValueError(f"{annotation_file}: category id {category['id']} is listed twice, as "
                             f"{names[category['id']]!r} and {category['name']!r}; expected one name per id")
        names[category["id"]] = category["name"]
    return dict(sorted(names.items()))


def _segments(annotation: dict) -> list:
    """The boxes of one annotation: its own (instances) or its segments_info (panoptic); segments_info that
    is not a list is one entry that is not an object."""
    segments = annotation.get("segments_info")
    return [annotation] if segments is None else segments if isinstance(segments, list) else [segments]


def _parse_coco(names: dict, annotations: list[dict], categories: dict[object, str], image_dir: Path,
                keep_crowd: bool, min_box_size: float) -> BoxDataset:
    index_of = {category_id: index for index, category_id in enumerate(categories)}
    per_image: dict[object, list[dict]] = {image_id: [] for image_id in names}
    for annotation in annotations:
        per_image[annotation["image_id"]].extend(_segments(annotation))
    dataset = BoxDataset(list(categories.values()), [])
    for image_id, file_name in names.items():
        boxes, labels = [], []
        for segment in per_image[image_id]:
            if not isinstance(segment, dict):
                dataset.skipped["annotation_not_an_object"] += 1
                continue
            if segment.get("iscrowd", 0) and not keep_crowd:
                dataset.skipped["crowd_box"] += 1
                continue
            category = segment.get("category_id")  # None where missing: counted as unknown, not a KeyError
            if not isinstance(category, Hashable) or category not in index_of:
                dataset.skipped["unknown_category"] += 1
                continue
            box, reason = coco_box(segment.get("bbox"))
            if reason is not None:
                dataset.skipped[reason] += 1
                continue
            x1, y1, x2, y2 = box
            if (x2 - x1) * (y2 - y1) < min_box_size ** 2:
                dataset.skipped["box_under_min_size"] += 1
                continue
            boxes.append(box)
            labels.append(index_of[category])
        if boxes:
            path = image_dir / file_name
            dataset.images.append(BoxImage(lambda path=path: Image.open(path), boxes, labels, file_name))
    return dataset


def crops_from_source(image: Image.Image, boxes: torch.Tensor, transform: RegionTransform) -> torch.Tensor:
    """Crops of `boxes` (at the model input's scale, as `transform` returns them) cut from `image` at its
    own resolution and resized to the model input, normalised: [k, 3, H, W]. Crops of the resized input
    would blur small boxes, understating the crop baseline the region path is compared with."""
    width, height = image.size
    source = TF.normalize(TF.to_tensor(to_rgb(image)), transform.mean, transform.std)
    to_source = boxes.new_tensor([width / transform.width, height / transform.height] * 2)
    every_box = torch.ones(1, len(boxes), dtype=torch.bool)
    return crop_regions(source[None], (boxes * to_source)[None], every_box, 1.0, (transform.height, transform.width))


def _batches(images: Sequence[BoxImage], transform: RegionTransform, batch_size: int, skipped: Counter,
             with_crops: bool) -> Iterator[tuple]:
    """Transformed images with padded boxes (and source-resolution crops of the boxes when `with_crops`);
    unreadable images and invalid boxes are counted in `skipped`."""
    pending: list[tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor | None]] = []
    for item in images:
        image = open_image(item.image)
        if image is None:
            skipped["unreadable_image"] += 1
            continue
        tensor, boxes, kept, drops = transform(image, item.boxes)
        skipped.update(drops)
        if kept:
            crops = crops_from_source(image, boxes, transform) if with_crops else None
            pending.append((tensor, boxes, [item.labels[i] for i in kept], crops))
        if len(pending) == batch_size:
            yield _pad(pending)
            pending = []
    if pending:
        yield _pad(pending)


def _pad(items: list[tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor | None]]) -> tuple:
    slots = max(len(labels) for _, _, labels, _ in items)
    boxes = torch.zeros(len(items), slots, 4)
    mask = torch.zeros(len(items), slots, dtype=torch.bool)
    for row, (_, item_boxes, labels, _) in enumerate(items):
        boxes[row, :len(labels)] = item_boxes
        mask[row, :len(labels)] = True
    labels = torch.tensor([label for _, _, item_labels, _ in items for label in item_labels])
    crops = None if items[0][3] is None else torch.cat([item_crops for *_, item_crops in items])
    return torch.stack([tensor for tensor, *_ in items]), boxes, mask, labels, crops


@torch.no_grad()
def evaluate_box_classification(
    model: FineCLIP, tokenizer: Callable[[list[str]], torch.Tensor], normalization: tuple, dataset: BoxDataset,
    templates: str = "vild", batch_size: int = 16, crop_baseline: bool = True, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32, progress: bool = True,
) -> dict[str, float]:
    """Region (dense-path) and, optionally, crop-baseline top-1/top-5; per-class mean and overall."""
    device = torch.device(device)
    classes = class_embeddings(model, tokenizer, dataset.class_names, templates, device)
    transform = RegionTransform(model.image_size, *normalization)
    skipped = Counter(dataset.skipped)
    region_scores, crop_scores, labels = [], [], []
    # counted in images, whose number the annotations give: batches are known only as unreadable images drop out
    counted = tqdm(dataset.images, desc="box classification", unit="img", disable=not progress)
    for images, boxes, mask, batch_labels, crops in _batches(counted, transform, batch_size, skipped, crop_baseline):
        images, boxes, mask = images.to(device, dtype), boxes.to(device), mask.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            dense, grid_hw = model.encode_dense(images)
            regions = model.region_features(dense, grid_hw, boxes, mask)[mask]
            crop_embeddings = None if crops is None else model.encode_image(crops.to(device, dtype))
        # scores in fp32, outside autocast: bf16 rounds cosines to steps of ~0.002, and ties count as misses
        region_scores.append((regions.float() @ classes.T).cpu())
        if crop_embeddings is not None:
            crop_scores.append((crop_embeddings.float() @ classes.T).cpu())
        labels.append(batch_labels)
    if not labels:  # e.g. --images names the wrong folder: every image unreadable
        raise ValueError(f"no box to classify in {len(dataset.images)} images with boxes; skipped: {dict(skipped)}")
    all_labels = torch.cat(labels)
    results = {f"region_{k}": v for k, v in box_classification_metrics(torch.cat(region_scores), all_labels,
                                                                        len(dataset.class_names)).items()}
    if crop_baseline:
        crop = box_classification_metrics(torch.cat(crop_scores), all_labels, len(dataset.class_names))
        results.update({f"crop_{k}": v for k, v in crop.items() if k.startswith("top")})
    results.update({f"skipped_{reason}": float(count) for reason, count in skipped.items()})
    return results
