"""Image-text retrieval Recall@1/5/10 on COCO-Karpathy or Flickr30k-style caption files."""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from tqdm import tqdm
from torchvision.transforms import functional as TF

from fineclip_ds.data.images import open_image, to_rgb
from fineclip_ds.evaluation.metrics import retrieval_metrics
from fineclip_ds.models.fineclip import FineCLIP

log = logging.getLogger("fineclip_ds")


@dataclass
class CaptionedImage:
    image: Callable[[], Image.Image]
    captions: list[str]


@dataclass
class CaptionFile:
    """The images of a caption file with their captions, and what reading it merged or skipped (reported with
    the recalls, so a file that lost rows does not pass for a clean one)."""
    images: list[CaptionedImage]
    merged_duplicate_image_rows: int = 0
    skipped: Counter = field(default_factory=Counter)

    def counts(self) -> dict[str, float]:
        return {"merged_duplicate_image_rows": float(self.merged_duplicate_image_rows),
                **{f"skipped_{reason}": float(count) for reason, count in self.skipped.items()}}


def load_caption_file(path: Path, image_dir: Path, split: str = "test") -> CaptionFile:
    """Karpathy JSON ({"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}) or a list of
    {"image": file, "caption": caption or [captions]} (the open_clip / BLIP retrieval files).

    Rows naming the same image are one image with all their captions, in order of first appearance: as separate
    images their copies tie with each other and recall collapses."""
    data = json.loads(Path(path).read_text())
    expected = f"{path}: expected a Karpathy JSON (with 'images') or a list of {{image, caption}} records"
    try:  # a COCO captions file also has 'images', but no filename/sentences in them
        if isinstance(data, dict) and "images" in data:
            rows = _karpathy_rows(data["images"], split)
            if not rows:  # said here, not later as "no readable images"
                raise ValueError(f"{path}: no entry has split {split!r} (splits in the file: "
                                 f"{sorted({str(entry.get('split')) for entry in data['images']})}); see --split")
        elif isinstance(data, list):
            rows = [(Path(entry["image"]), _as_list(entry["caption"])) for entry in data]
        else:
            raise ValueError(expected)
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{expected} ({type(error).__name__}: {error})") from error
    captioned = _grouped(rows, Path(image_dir))
    if not captioned.images:  # said before the model loads, not after it as "no readable images"
        raise ValueError(f"{path}: no image with a caption to evaluate retrieval on ({len(rows)} rows; skipped: "
                         f"{dict(captioned.skipped)})")
    return captioned


def _karpathy_rows(entries: list[dict], split: str) -> list[tuple[Path, list]]:
    return [(Path(entry.get("filepath", "")) / entry["filename"], [sentence["raw"] for sentence in entry["sentences"]])
            for entry in entries if entry.get("split", split) == split]


def _as_list(caption: object) -> list:
    return caption if isinstance(caption, list) else [caption]


def _grouped(rows: list[tuple[Path, list]], image_dir: Path) -> CaptionFile:
    """One CaptionedImage per distinct image file, its captions in file order. Non-string captions (null,
    numbers) are dropped and counted here, before any model work: the tokenizer fails on them only after
    every image is encoded."""
    captions_of: dict[Path, list[str]] = {}
    skipped: Counter = Counter()
    for file, captions in rows:
        texts = [caption for caption in captions if isinstance(caption, str)]
        skipped["non_string_caption"] += len(captions) - len(texts)
        captions_of.setdefault(file, []).extend(texts)
    images = [CaptionedImage(lambda file=image_dir / file: Image.open(file), captions)
              for file, captions in captions_of.items() if captions]
    skipped["no_caption"] += len(captions_of) - len(images)  # kept, it would lower image-to-text recall quietly
    return CaptionFile(images, len(rows) - len(captions_of), +skipped)


RESIZE_MODES = ("center_crop", "squash")


def captions_over_context(tokenizer: Callable[[list[str]], torch.Tensor], captions: list[str]) -> int | None:
    """How many captions the tokenizer cuts at its context length (77 tokens for CLIP, start and end tokens
    included), which it does without a word; None for a tokenizer that cannot say (no encode/context_length)."""
    encode, context_length = getattr(tokenizer, "encode", None), getattr(tokenizer, "context_length", None)
    if encode is None or context_length is None:
        return None
    return sum(len(encode(caption)) + 2 > context_length for caption in captions)


def _resized(image: Image.Image, size: list[int], resize: str) -> Image.Image:
    """The model input, [height, width] = size: squashed, or scaled to cover it and centre-cropped as open_clip's
    validation transform does: for a square input by torchvision's shorter-side resize, which truncates the longer
    side (640 x 480 -> 298 x 224, not 299), for another input with its longer side rounded (ResizeKeepRatio)."""
    bicubic = TF.InterpolationMode.BICUBIC
    if resize == "squash":
        return TF.resize(image, size, interpolation=bicubic, antialias=True)
    height, width = size
    if height == width:
        return TF.center_crop(TF.resize(image, height, interpolation=bicubic, antialias=True), size)
    scale = max(height / image.height, width / image.width)
    covering = [max(height, round(image.height * scale)), max(width, round(image.width * scale))]
    return TF.center_crop(TF.resize(image, covering, interpolation=bicubic, antialias=True), size)


@torch.no_grad()
def evaluate_retrieval(
    model: FineCLIP, tokenizer: Callable[[list[str]], torch.Tensor], normalization: tuple,
    items: Sequence[CaptionedImage], batch_size: int = 32, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32, progress: bool = True, resize: str = "center_crop",
) -> dict[str, float]:
    """Embeds every image and caption once, then ranks; unreadable images are skipped and counted.

    resize: "center_crop" (default) is open_clip's validation transform, the protocol published CLIP and
    FineCLIP retrieval numbers use: scaled to cover the input size, then the centre crop. "squash" resizes
    the whole image to the input size, as training does (data/transforms.py); on non-square images the
    two give different numbers."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize: got {resize!r}, expected one of {RESIZE_MODES}")
    device = torch.device(device)
    size = list(model.image_size)
    image_embeddings, text_embeddings, text_to_image = [], [], []
    skipped: Counter = Counter()
    pending: list[torch.Tensor] = []

    def flush() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            image_embeddings.append(model.encode_image(torch.stack(pending).to(device, dtype)).float().cpu())
        pending.clear()

    for item in tqdm(items, desc="retrieval: images", unit="img", disable=not progress):
        image = open_image(item.image)
        if image is None:
            skipped["unreadable_image"] += 1
            continue
        pending.append(TF.normalize(TF.to_tensor(_resized(to_rgb(image), size, resize)), *normalization))
        image_index = sum(len(chunk) for chunk in image_embeddings) + len(pending) - 1
        text_to_image += [image_index] * len(item.captions)
        text_embeddings += item.captions
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    if not image_embeddings:
        raise ValueError("no readable images to evaluate retrieval on")
    captions = text_embeddings
    truncated = captions_over_context(tokenizer, captions)
    if truncated:
        log.warning("retrieval: %d of %d captions are longer than the tokenizer's %d-token context and are cut",
                    truncated, len(captions), tokenizer.context_length)
    encoded = []
    for start in range(0, len(captions), batch_size * 4):
        tokens = tokenizer(captions[start:start + batch_size * 4]).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            encoded.append(model.encode_text(tokens).float().cpu())
    similarity = torch.cat(image_embeddings) @ torch.cat(encoded).T
    results = retrieval_metrics(similarity, torch.tensor(text_to_image))
    results.update({"images": float(similarity.shape[0]), "texts": float(similarity.shape[1])})
    if truncated is not None:
        results["captions_truncated"] = float(truncated)
    results.update({f"skipped_{reason}": float(count) for reason, count in skipped.items()})
    return results
