import io

import numpy as np
import torch
from PIL import Image

from fineclip_ds.data.transforms import RegionTransform, validate_boxes
from tests.data.helpers import MEAN, STD


def test_each_bad_box_is_dropped_and_counted_by_reason():
    boxes = [[0, 0, 10, 10], [5, 5, 2, 9], [float("inf"), 0, 1, 1], [200, 200, 300, 300], [-5, 90, 20, 140], [1, 2, 3],
             None, 7, "0 0 5 5", [True, 0, 5, 5]]
    kept, index, drops = validate_boxes(boxes, width=100, height=100)
    assert kept == [[0, 0, 10, 10], [0, 90, 20, 100]]
    assert index == [0, 4]
    assert drops == {"box_non_positive": 1, "box_not_finite": 1, "box_outside": 1, "box_malformed": 5}


def test_coordinates_that_are_not_numbers_are_malformed_and_huge_integers_not_finite():
    """JSON integers have no size limit, and float() of one past 1e308 raises: the box is counted, not a crash."""
    boxes = [["1", "1", "5", "5"], [None, 0, 5, 5], [0, 0, 10 ** 400, 5], [0, 0, 1e400, 5], [0, 0, 5, 5]]
    kept, index, drops = validate_boxes(boxes, width=100, height=100)
    assert kept == [[0, 0, 5, 5]] and index == [4]
    assert drops == {"box_malformed": 2, "box_not_finite": 2}


def test_boxes_scale_with_the_image_and_thin_boxes_are_dropped():
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    transform = RegionTransform(50, MEAN, STD)
    tensor, boxes, index, drops = transform(image, [[20, 10, 120, 90], [0, 0, 3, 50]])
    assert tensor.shape == (3, 50, 50)
    torch.testing.assert_close(tensor[0], torch.full((50, 50), 2.0))  # (1 - 0.5) / 0.25
    torch.testing.assert_close(boxes, torch.tensor([[5.0, 5.0, 30.0, 45.0]]))
    assert index == [0] and drops == {"box_too_small": 1}


def test_no_boxes_gives_an_empty_box_tensor():
    _, boxes, index, drops = RegionTransform(32, MEAN, STD)(Image.new("RGB", (64, 64)), [])
    assert boxes.shape == (0, 4) and index == [] and not drops


def test_a_16_bit_grey_png_is_scaled_to_8_bits_not_clipped_white():
    """PIL opens it as "I;16" and its convert("RGB") clips every value above 255: the image went white."""
    levels = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    encoded = io.BytesIO()
    Image.fromarray(levels).save(encoded, format="PNG")
    sixteen_bit = Image.open(io.BytesIO(encoded.getvalue()))
    eight_bit = Image.fromarray((levels >> 8).astype(np.uint8)).convert("RGB")
    transform = RegionTransform(32, MEAN, STD, crop_source_scale=2)
    torch.testing.assert_close(transform(sixteen_bit, [])[0], transform(eight_bit, [])[0])
    torch.testing.assert_close(transform.crop_source(sixteen_bit), transform.crop_source(eight_bit))


def test_boxes_from_a_detector_as_arrays_or_tensors_are_kept_like_lists():
    """A numpy array, a tensor, a list of rows of either, or numpy integers: the same boxes as plain lists
    (every one of them was dropped as box_malformed, so a library caller got no regions and no error)."""
    listed = [[10, 20, 50, 60], [0.5, 1.5, 30.25, 40.0]]
    kept, indices, drops = validate_boxes(listed, 100, 80)
    array = np.array(listed, dtype=np.float32)
    for boxes in (array, torch.tensor(listed), list(array), list(torch.tensor(listed)),
                  [[np.int64(v) for v in listed[0]], [np.float64(v) for v in listed[1]]]):
        assert validate_boxes(boxes, 100, 80) == (kept, indices, drops), type(boxes)
    assert len(kept) == 2 and not drops
    assert validate_boxes([[np.bool_(True), 1, 2, 3]], 100, 80)[2] == {"box_malformed": 1}
