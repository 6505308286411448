"""Zero-shot semantic segmentation from the dense feature map: every token against the class-name
embeddings, logits upsampled to the image, argmax per pixel. Measures what region-aware training
is for: dense features that name what is under them."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import functional as TF
from tqdm import tqdm

from fineclip_ds.data.images import open_image, to_rgb
from fineclip_ds.evaluation.metrics import confusion_matrix, segmentation_metrics
from fineclip_ds.evaluation.zero_shot import class_embeddings
from fineclip_ds.models.fineclip import FineCLIP

IGNORE_LABEL = 255
LABEL_PROBLEMS = {"missing_label": "no label map",
                  "unreadable_label": "the label map cannot be read",
                  "label_not_1_channel": "the label map has several channels (an RGB colour-coded PNG?); a 1-channel "
                                         "map of class indices is needed (mode L, P, 16-bit I;16 or 32-bit I)",
                  "label_not_integer": "the label map holds floating-point values (mode F); class indices are whole "
                                       "numbers (mode L, P, 16-bit I;16 or 32-bit I)",
                  "label_negative_value": "the label map holds {value}, a negative value; class indices start at 0",
                  "label_size_mismatch": "the label map is {value} (width x height); it must be its image's size, "
                                         "one class index per pixel"}
log = logging.getLogger("fineclip_ds")


@dataclass
class LabelledImage:
    image: Callable[[], Image.Image]
    labels: Callable[[], Image.Image]  # 1-channel integer map (L, P, I;16, I): class index per pixel
    label_path: Path | None = None  # where `labels` reads from, to tell a missing label map from a bad one


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")  # as dense-viz reads (.webp was skipped here)


def load_label_folder(image_dir: Path, label_dir: Path, class_file: Path) -> tuple[list[str], list[LabelledImage]]:
    """ADE20K / Pascal Context style: images, label PNGs of the same stem, one class name per line."""
    class_names = [line.strip() for line in Path(class_file).read_text().splitlines()]
    while class_names and not class_names[-1]:  # trailing blank lines name nothing
        class_names.pop()
    if not class_names:  # failed in open_clip, after the model loaded
        raise ValueError(f"--classes {class_file}: no class names; expected one per line")
    if "" in class_names:  # dropped, it shifted every later name onto the next label index, silently
        raise ValueError(f"--classes {class_file}: line {class_names.index('') + 1} is blank; line k names label "
                         "index k - 1, so name it (e.g. 'unlabeled') or remove it and renumber the labels")
    items = []
    for image_path in sorted(p for p in Path(image_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        label_path = Path(label_dir) / f"{image_path.stem}.png"
        items.append(LabelledImage(lambda p=image_path: Image.open(p), lambda p=label_path: Image.open(p),
                                   label_path))
    return class_names, items


def unscored_label(num_classes: int) -> int:
    """The value `label_indices` marks unscored pixels with: IGNORE_LABEL, or with more classes than that (16-bit
    maps: ADE20K-847, Pascal Context 459) a value no class has, since 255 is then a class index."""
    return max(IGNORE_LABEL, num_classes)


def label_indices(labels: Image.Image, num_classes: int, reduce_zero_label: bool) -> tuple[torch.Tensor, int]:
    """Class index per pixel (`unscored_label(num_classes)` where unscored) and how many pixels named no known class.

    `reduce_zero_label`: the PNG stores class k as k + 1 and 0 as "other", unscored (ADE20K's
    ADEChallengeData2016 annotations and Pascal Context 59 as mmseg ships them); without it the pixel
    value is the class index, 255 unscored (the built-in world's label maps). 255 is unscored only where it
    names no class: with over 255 classes (16-bit maps, whose unscored value, e.g. 65535, names no class
    either) it is a class like any other.
    """
    # -> [H, W] int64
    stored = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    target = stored - 1 if reduce_zero_label else stored.clone()
    unscored = (stored == 0) if reduce_zero_label else torch.zeros_like(stored, dtype=torch.bool)
    unscored |= (stored == IGNORE_LABEL) & (target >= num_classes)
    unknown = (target >= num_classes) & ~unscored
    target[unscored | unknown] = unscored_label(num_classes)
    return target, int(unknown.sum())


def _scorable_labels(item: LabelledImage, image_size: tuple[int, int]) -> tuple[Image.Image | None, str, str]:
    """The label map, or which of LABEL_PROBLEMS keeps it from being scored and the value that says so. Checked
    before the model runs: an RGB map crashed the metrics, a negative value (a signed 32-bit map) or NaN (a float
    map, read as int64's most negative value) made bincount fail or count the pixel as a class. `image_size`:
    (width, height) of the image the map labels."""
    if item.label_path is not None and not item.label_path.exists():
        return None, "missing_label", ""
    labels = open_image(item.labels)
    if labels is None:
        return None, "unreadable_label", ""
    if len(labels.getbands()) != 1:
        return None, "label_not_1_channel", ""
    if labels.mode == "F":
        return None, "label_not_integer", ""
    lowest = int(np.asarray(labels).min(initial=0))
    if lowest < 0:
        return None, "label_negative_value", str(lowest)
    if labels.size != image_size:
        return None, "label_size_mismatch", "{}x{}, its image {}x{}".format(*labels.size, *image_size)
    return labels, "", ""


def _window_logits(model: FineCLIP, window: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """fp32 logits even under autocast, which would run the matmul in bf16 and round close classes to ties
    that argmax gives to the lower class index."""
    # window: [1, 3, h, w] at the model's input size -> [K, h, w] per-pixel cosine logits
    dense, grid_hw = model.encode_dense(window)
    with torch.autocast(window.device.type, enabled=False):
        logits = (dense[0].float() @ classes.T).T.reshape(-1, *grid_hw)
        return F.interpolate(logits.unsqueeze(0), size=window.shape[-2:], mode="bilinear", align_corners=False)[0]


def segment(model: FineCLIP, image: torch.Tensor, classes: torch.Tensor, slide: bool) -> torch.Tensor:
    """image: [3, H, W] normalised -> [H, W] class per pixel. Without `slide` the image is resized to
    the model's input; with it, model-sized windows at 2/3 stride are averaged (large images)."""
    height, width = image.shape[-2:]
    size = model.image_size
    if not slide:
        resized = F.interpolate(image.unsqueeze(0), size=size, mode="bilinear", align_corners=False)
        logits = _window_logits(model, resized, classes)
        return F.interpolate(logits.unsqueeze(0), size=(height, width), mode="bilinear", align_corners=False)[0].argmax(0)
    padded = F.pad(image, (0, max(0, size[1] - width), 0, max(0, size[0] - height)))
    logits = padded.new_zeros(classes.shape[0], *padded.shape[-2:], dtype=torch.float32)
    counts = torch.zeros_like(logits[:1])
    stride = (max(1, size[0] * 2 // 3), max(1, size[1] * 2 // 3))
    tops = list(range(0, padded.shape[-2] - size[0] + 1, stride[0]))
    lefts = list(range(0, padded.shape[-1] - size[1] + 1, stride[1]))
    tops += [padded.shape[-2] - size[0]] if tops[-1] != padded.shape[-2] - size[0] else []
    lefts += [padded.shape[-1] - size[1]] if lefts[-1] != padded.shape[-1] - size[1] else []
    for top in tops:
        for left in lefts:
            window = padded[:, top:top + size[0], left:left + size[1]].unsqueeze(0)
            logits[:, top:top + size[0], left:left + size[1]] += _window_logits(model, window, classes)
            counts[:, top:top + size[0], left:left + size[1]] += 1
    return (logits / counts)[:, :height, :width].argmax(0)


@torch.no_grad()
def evaluate_segmentation(model: FineCLIP, tokenizer: Callable[[list[str]], torch.Tensor], normalization: tuple,
                          class_names: list[str], items: Iterable[LabelledImage], templates: str = "openai",
                          slide: bool = False, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                          progress: bool = True, reduce_zero_label: bool = False) -> dict[str, float]:
    device = torch.device(device)
    classes = class_embeddings(model, tokenizer, class_names, templates, device)
    confusion = torch.zeros(len(class_names), len(class_names), dtype=torch.long)
    skipped: Counter = Counter()
    for item in tqdm(list(items), desc="segmentation", unit="img", disable=not progress):
        image = open_image(item.image)
        if image is None:
            skipped["unreadable_image"] += 1
            continue
        labels, problem, value = _scorable_labels(item, image.size)
        if labels is None:
            skipped[problem] += 1
            if skipped[problem] == 1:
                log.warning("segmentation: %s: %s; skipped, counted as skipped_%s", item.label_path,
                            LABEL_PROBLEMS[problem].format(value=value), problem)
            continue
        tensor = TF.normalize(TF.to_tensor(to_rgb(image)), *normalization).to(device, dtype)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            predicted = segment(model, tensor, classes, slide).cpu()
        target, unknown = label_indices(labels, len(class_names), reduce_zero_label)
        skipped["unknown_label_pixels"] += unknown
        confusion += confusion_matrix(predicted, target, len(class_names), unscored_label(len(class_names)))
    if confusion.sum() == 0:  # a wrong --labels folder: reporting mIoU 0 would read as a result
        raise ValueError(f"no pixel scored; skipped: {dict(skipped)}")
    return {**segmentation_metrics(confusion), **{f"skipped_{reason}": float(n) for reason, n in skipped.items() if n}}
