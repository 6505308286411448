"""The crop baseline's crops come from the image at its own resolution, not from the resized model input."""
from collections import Counter

import numpy as np
import torch
from PIL import Image

from fineclip_ds.data.transforms import RegionTransform
from fineclip_ds.evaluation.box_classification import BoxImage, _batches
from fineclip_ds.models.regions import crop_regions


def test_crops_keep_the_detail_of_a_small_box_that_the_model_input_blurs():
    """A 1-pixel checkerboard inside a 32 px box of a 384 px image: at the 96 px model input the box is
    8 px of flat grey, while the source-resolution crop still alternates."""
    pixels = np.zeros((384, 384, 3), dtype=np.uint8)
    rows, columns = np.indices((32, 32))
    pixels[64:96, 64:96] = (((rows + columns) % 2) * 255)[..., None]
    item = BoxImage(lambda: Image.fromarray(pixels), [[64, 64, 96, 96], [0, 0, 384, 384]], [0, 1])
    transform = RegionTransform(96, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    skipped: Counter = Counter()
    images, boxes, mask, labels, crops = next(_batches([item], transform, 4, skipped, with_crops=True))
    assert crops.shape == (2, 3, 96, 96) and labels.tolist() == [0, 1] and not skipped
    assert images[0, :, 17:23, 17:23].std() < 0.05  # the box's inside at the model input: flat grey
    crop_of_the_input = crop_regions(images, boxes, mask, 1.0, (96, 96))[0]
    assert crops[0].std() > 0.35 > 2 * crop_of_the_input.std()
    # the whole-image box is the whole image, resized: the model input up to resampling differences
    assert (crops[1] - images[0]).abs().mean() < 0.02


def test_no_crops_are_made_without_the_baseline():
    item = BoxImage(lambda: Image.new("RGB", (50, 40)), [[1, 1, 20, 20]], [0])
    *_, crops = next(_batches([item], RegionTransform(32, (0.5,) * 3, (0.5,) * 3), 4, Counter(), with_crops=False))
    assert crops is None
