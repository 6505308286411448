"""Image-text retrieval Recall@1/5/10 on COCO-Karpathy or Flickr30k-style caption files."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from tqdm import tqdm
from torchvision.transforms import functional as TF

from fineclip_ds.data.images import open_image
from fineclip_ds.evaluation.metrics import retrieval_metrics
from fineclip_ds.models.fineclip import FineCLIP


@dataclass
class CaptionedImage:
    image: Callable[[], Image.Image]
    captions: list[str]


def load_caption_file(path: Path, image_dir: Path, split: str = "test") -> list[CaptionedImage]:
    """Karpathy JSON ({"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}) or a list of
    {"image": file, "caption": [captions]} (the open_clip / BLIP retrieval files)."""
    data = json.loads(Path(path).read_text())
    items: list[CaptionedImage] = []
    expected = f"{path}: expected a Karpathy JSON (with 'images') or a list of {{image, caption}} records"
    try:  # a COCO captions file also has 'images', but no filename/sentences in them
        if isinstance(data, dict) and "images" in data:
            for entry in data["images"]:
                if entry.get("split", split) != split:
                    continue
                file = Path(image_dir) / entry.get("filepath", "") / entry["filename"]
                captions = [sentence["raw"] for sentence in entry["sentences"]]
                items.append(CaptionedImage(lambda file=file: Image.open(file), captions))
        elif isinstance(data, list):
            for entry in data:
                captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
                file = Path(image_dir) / entry["image"]
                items.append(CaptionedImage(lambda file=file: Image.open(file), captions))
        else:
            raise ValueError(expected)
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{expected} ({type(error).__name__}: {error})") from error
    return items


@torch.no_grad()
def evaluate_retrieval(
    model: FineCLIP, tokenizer: Callable[[list[str]], torch.Tensor], normalization: tuple,
    items: Sequence[CaptionedImage], batch_size: int = 32, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32, progress: bool = True,
) -> dict[str, float]:
    """Embeds every image and caption once, then ranks; unreadable images are skipped and counted.

    Images are resized to the model's input without a centre crop, as in training (data/transforms.py);
    open_clip's validation transform centre-crops, so on non-square images its numbers can differ."""
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
        resized = TF.resize(image.convert("RGB"), size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        pending.append(TF.normalize(TF.to_tensor(resized), *normalization))
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
    encoded = []
    for start in range(0, len(captions), batch_size * 4):
        tokens = tokenizer(captions[start:start + batch_size * 4]).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            encoded.append(model.encode_text(tokens).float().cpu())
    similarity = torch.cat(image_embeddings) @ torch.cat(encoded).T
    results = retrieval_metrics(similarity, torch.tensor(text_to_image))
    results.update({"images": float(similarity.shape[0]), "texts": float(similarity.shape[1])})
    results.update({f"skipped_{reason}": float(count) for reason, count in skipped.items()})
    return results
