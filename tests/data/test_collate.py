from collections import Counter

import pytest
import torch

from fineclip_ds.data.collate import RegionCollator, TransformedSample
from tests.data.helpers import length_tokenizer


def _sample(boxes: int, caption: str = "img", drops: Counter | None = None) -> TransformedSample:
    return TransformedSample(torch.zeros(3, 8, 8), caption, torch.arange(boxes * 4, dtype=torch.float32).view(boxes, 4),
                             [f"region {i}" for i in range(boxes)], drops or Counter())


def test_pads_to_the_largest_count_and_masks_the_padding():
    batch = RegionCollator(length_tokenizer, max_boxes=5)([_sample(1), _sample(3, "image two"), _sample(0)])
    assert batch["boxes"].shape == (3, 3, 4) and batch["region_texts"].shape == (3, 3, 1)
    assert batch["box_mask"].tolist() == [[True, False, False], [True, True, True], [False, False, False]]
    torch.testing.assert_close(batch["boxes"][1], torch.arange(12, dtype=torch.float32).view(3, 4))
    assert batch["texts"].flatten().tolist() == [3, 9, 3]
    assert batch["region_texts"][1].flatten().tolist() == [8, 8, 8]
    assert batch["region_texts"][0].flatten().tolist() == [8, 0, 0]
    assert batch["data_stats"] == {"samples": 3, "regions": 4}


def test_boxes_over_the_cap_are_counted_and_upstream_drops_carried():
    batch = RegionCollator(length_tokenizer, max_boxes=2)([_sample(4, drops=Counter(corrupt_image=2)), _sample(1)])
    assert batch["boxes"].shape == (2, 2, 4)
    assert batch["data_stats"] == {"samples": 2, "regions": 3, "box_over_max": 2, "corrupt_image": 2}


def test_rejects_a_cap_below_one():
    with pytest.raises(ValueError, match="max_boxes=0"):
        RegionCollator(length_tokenizer, max_boxes=0)
