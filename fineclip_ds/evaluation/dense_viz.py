"""Dense features as a picture: the first three principal components of the token map as RGB, the
view the FineCLIP paper uses to show that region-aware training gives cleaner, object-aligned maps."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF
from tqdm import tqdm

from fineclip_ds.data.images import open_image, to_rgb
from fineclip_ds.models.fineclip import FineCLIP


def pca_rgb(dense: torch.Tensor, grid_hw: tuple[int, int]) -> np.ndarray:
    """[h*w, D] token features -> [h, w, 3] uint8: top-3 principal components, each min-max scaled."""
    centred = dense.float() - dense.float().mean(dim=0, keepdim=True)
    _, _, components = torch.linalg.svd(centred, full_matrices=False)
    projected = centred @ components[:3].T
    if projected.shape[1] < 3:
        projected = torch.nn.functional.pad(projected, (0, 3 - projected.shape[1]))
    low, high = projected.min(dim=0).values, projected.max(dim=0).values
    scaled = (projected - low) / (high - low).clamp(min=1e-8)
    return (scaled.reshape(*grid_hw, 3).numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def dense_feature_picture(model: FineCLIP, normalization: tuple, image: Image.Image, device: torch.device | str = "cpu",
                          dtype: torch.dtype = torch.float32) -> Image.Image:
    """The input (resized to the model's size) and its PCA picture side by side."""
    size = list(model.image_size)
    resized = TF.resize(to_rgb(image), size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    batch = TF.normalize(TF.to_tensor(resized), *normalization).unsqueeze(0).to(device, dtype)
    dense, grid_hw = model.encode_dense(batch)
    picture = Image.fromarray(pca_rgb(dense[0].cpu(), grid_hw)).resize(resized.size, Image.NEAREST)
    side_by_side = Image.new("RGB", (resized.width * 2, resized.height))
    side_by_side.paste(resized, (0, 0))
    side_by_side.paste(picture, (resized.width, 0))
    return side_by_side


def picture_names(image_paths: list[Path]) -> list[str]:
    """`<stem>_dense.png`, or `<name>_dense.png` (extension kept) for images sharing a stem, numbered where
    that name is still taken twice: dup.jpg and dup.png both wrote dup_dense.png, one picture lost and listed
    twice."""
    stems = Counter(Path(path).stem for path in image_paths)
    candidates = [f"{Path(path).stem if stems[Path(path).stem] == 1 else Path(path).name}_dense.png"
                  for path in image_paths]
    uses, taken, names = Counter(candidates), set(candidates), []
    for name in candidates:
        if uses[name] > 1:  # rare: dup.jpg named in full beside dup.png, and dup.jpg.webp whose stem is dup.jpg
            base, number = name.removesuffix("_dense.png"), 2
            while f"{base}_{number}_dense.png" in taken:
                number += 1
            name = f"{base}_{number}_dense.png"
            taken.add(name)
        names.append(name)
    return names


def write_dense_pictures(model: FineCLIP, normalization: tuple, image_paths: list[Path], output_dir: Path,
                         device: torch.device | str = "cpu", progress: bool = True) -> tuple[list[Path], int]:
    """One picture per readable image (named by `picture_names`); returns the pictures and how many images were
    unreadable."""
    output_dir.mkdir(parents=True, exist_ok=True)
    written, unreadable = [], 0
    names = picture_names(image_paths)
    for path, name in tqdm(list(zip(image_paths, names)), desc="dense pictures", unit="img", disable=not progress):
        image = open_image(lambda: Image.open(path))
        if image is None:
            unreadable += 1
            continue
        target = output_dir / name
        dense_feature_picture(model, normalization, image, device).save(target)
        written.append(target)
    return written, unreadable
