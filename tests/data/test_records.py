"""decode_record: every way a training-format record can be malformed is skipped or trimmed and counted, never raised."""
import io
import json

import pytest
from PIL import Image

from fineclip_ds.data.records import decode_record
from fineclip_ds.data.transforms import RegionTransform
from tests.data.helpers import MEAN, STD


def _record(caption, boxes, region_captions) -> dict:
    image = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(image, format="PNG")
    return {"__key__": "k", "png": image.getvalue(), "txt": caption,
            "json": json.dumps({"boxes": boxes, "region_captions": region_captions})}


def _decode(record: dict):
    return decode_record(record, RegionTransform(32, MEAN, STD))


@pytest.mark.parametrize("caption", [b"caf\xe9", b"", "   "], ids=["not-utf8", "empty", "blank"])
def test_a_caption_that_is_not_text_skips_the_record_and_is_counted(caption):
    sample, drops = _decode(_record(caption, [], []))
    assert sample is None and drops == {"bad_caption": 1}


def test_a_record_without_json_trains_the_global_loss_only_and_is_counted():
    """Boxes under another member name (`regions.json`) trained a whole data set as plain CLIP, uncounted."""
    record = _record(b"a picture", [[1, 1, 20, 20]], ["a box"])
    record["regions.json"] = record.pop("json")
    sample, drops = _decode(record)
    assert not drops and sample.caption == "a picture" and len(sample.boxes) == 0
    assert sample.drops == {"no_region_json": 1}


def test_region_captions_that_are_not_strings_are_bad_json():
    sample, drops = _decode(_record(b"a picture", [[1, 1, 20, 20]], [None]))
    assert sample is None and drops == {"bad_json": 1}


def test_region_captions_of_another_length_than_the_boxes_have_a_reason_of_their_own():
    """Captions that lost their pairing with the boxes (a captioner that skipped one) were counted as bad JSON."""
    sample, drops = _decode(_record(b"a picture", [[1, 1, 20, 20], [2, 2, 9, 9]], ["one caption"]))
    assert sample is None and drops == {"region_captions_mismatch": 1}


def test_malformed_boxes_and_empty_region_captions_are_trimmed_and_counted():
    boxes = [None, 3, [1, 1, 20, 20], [2, 2, 30, 30], [4, 4, 12, 12]]
    region_captions = ["null", "number", "kept", "  ", "also kept "]
    sample, drops = _decode(_record(b" a picture ", boxes, region_captions))
    assert not drops and sample.caption == "a picture"
    assert sample.region_captions == ["kept", "also kept"]
    assert sample.boxes.tolist() == [[1, 1, 20, 20], [4, 4, 12, 12]]
    assert sample.drops == {"box_malformed": 2, "region_caption_empty": 1}


def test_a_coordinate_too_large_for_a_float_drops_the_box_not_the_run():
    record = _record(b"a picture", [], [])
    record["json"] = '{"boxes": [[1, 1, 1' + "0" * 400 + ', 20], [1, 1, 20, 20]], "region_captions": ["huge", "kept"]}'
    sample, drops = _decode(record)
    assert not drops and sample.region_captions == ["kept"] and sample.drops == {"box_not_finite": 1}


def test_a_byte_order_mark_before_the_json_or_caption_is_ignored():
    record = _record("\ufeffa picture".encode(), [[1, 1, 20, 20]], ["kept"])
    record["json"] = b"\xef\xbb\xbf" + record["json"].encode()
    sample, drops = _decode(record)
    assert not drops and sample.caption == "a picture" and sample.region_captions == ["kept"]


def test_json_nested_past_the_recursion_limit_is_bad_json_not_a_crash():
    record = _record(b"a picture", [], [])
    record["json"] = "[" * 100_000 + "]" * 100_000
    sample, drops = _decode(record)
    assert sample is None and drops == {"bad_json": 1}
