"""The crop baseline's crops come from the image at its own resolution, not from the resized model input;
reading COCO boxes skips and counts bad annotations."""
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from fineclip_ds.data.transforms import RegionTransform
from fineclip_ds.evaluation.box_classification import BoxImage, _batches, load_coco_boxes
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


def _recording(function, calls: list):
    """`function`, appending (its arguments, its result) to `calls` on every call."""
    def record(*args):
        calls.append((args, function(*args)))
        return calls[-1][1]
    return record


def test_scores_are_fp32_products_of_the_features_under_bf16_autocast(monkeypatch):
    """Under autocast a matmul runs in bf16 even on .float() inputs: cosines rounded to ~0.002 steps tie,
    and ties count as misses. The scores must be the fp32 products of the region/crop embeddings."""
    import fineclip_ds.models.factory  # noqa: F401  registers the tiny model configs
    from fineclip_ds.config import ModelConfig
    from fineclip_ds.data.shapes_world import ShapesWorld
    from fineclip_ds.evaluation import box_classification
    from fineclip_ds.evaluation.world import world_box_dataset
    from fineclip_ds.models.factory import create_fineclip

    torch.manual_seed(0)
    model, tokenizer, normalization = create_fineclip(ModelConfig(name="FineCLIP-ViT-T-8", pretrained=""))
    regions, crops, scored = [], [], []
    monkeypatch.setattr(model, "region_features", _recording(model.region_features, regions))
    monkeypatch.setattr(model, "encode_image", _recording(model.encode_image, crops))
    monkeypatch.setattr(box_classification, "box_classification_metrics",
                        _recording(box_classification.box_classification_metrics, scored))
    dataset = world_box_dataset(ShapesWorld(seed=0, image_size=64), 8)
    box_classification.evaluate_box_classification(model.eval(), tokenizer, normalization, dataset, "shapes", 8,
                                                   dtype=torch.bfloat16, progress=False)
    classes = box_classification.class_embeddings(model, tokenizer, dataset.class_names, "shapes", torch.device("cpu"))
    [((*_, mask), region_features)], [(_, crop_embeddings)] = regions, crops  # one batch of 8 images
    (region_scores, *_), _ = scored[0]
    (crop_scores, *_), _ = scored[1]
    assert region_scores.dtype == crop_scores.dtype == torch.float32
    torch.testing.assert_close(region_scores, region_features[mask].float() @ classes.T, rtol=0, atol=1e-6)
    torch.testing.assert_close(crop_scores, crop_embeddings.float() @ classes.T, rtol=0, atol=1e-6)


def _coco_file(tmp_path, annotations: list, categories: list | None = None):
    """A one-image COCO instances file (a.png, 64 x 64) with `annotations`; category 3 is a circle."""
    coco = {"images": [{"id": 1, "file_name": "a.png"}], "annotations": annotations,
            "categories": categories or [{"id": 3, "name": "circle"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    return tmp_path / "coco.json"


def test_bad_annotations_are_skipped_and_counted_and_the_rest_kept(tmp_path):
    """Each of these aborted the whole evaluation ('malformed COCO annotations (KeyError: 999)', ...)."""
    good = {"image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5]}
    bad = [{"image_id": 999, "category_id": 3, "bbox": [1, 1, 5, 5]}, {"image_id": 1, "category_id": 3},
           {"image_id": 1, "category_id": 3, "bbox": ["1", "1", "5", "5"]},
           {"image_id": 1, "category_id": 3, "bbox": [1, 1, 5]}, "not an annotation"]
    dataset = load_coco_boxes(_coco_file(tmp_path, [good, *bad]), tmp_path)
    assert [image.boxes for image in dataset.images] == [[[1, 1, 6, 6]]]
    assert dataset.skipped == {"unknown_image": 1, "box_malformed": 3, "annotation_not_an_object": 1}


def test_panoptic_segments_that_are_not_objects_and_list_category_ids_are_skipped_and_counted(tmp_path):
    """Each escaped as a traceback: AttributeError ('NoneType' object has no attribute 'get'), TypeError (unhashable)."""
    good = {"category_id": 3, "bbox": [1, 1, 5, 5]}
    panoptic = [{"image_id": 1, "segments_info": [good, None, "segment", {"category_id": [3], "bbox": [1, 1, 5, 5]}]},
                {"image_id": 1, "segments_info": "not a list"}]
    dataset = load_coco_boxes(_coco_file(tmp_path, panoptic), tmp_path)
    assert [image.boxes for image in dataset.images] == [[[1, 1, 6, 6]]]
    assert dataset.skipped == {"annotation_not_an_object": 3, "unknown_category": 1}


def test_an_image_entry_whose_id_is_not_an_id_is_refused_naming_it(tmp_path):
    annotation_file = _coco_file(tmp_path, [])
    coco = json.loads(annotation_file.read_text())
    coco["images"][0]["id"] = [1]
    annotation_file.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"coco.json: images\[0\] = .*expected an object with 'id' and a"):
        load_coco_boxes(annotation_file, tmp_path)


def test_a_box_of_negative_width_is_counted_as_non_positive_not_as_small(tmp_path):
    """With no --min_box_size it was counted as box_under_min_size (w * h = -200 < 0)."""
    dataset = load_coco_boxes(_coco_file(tmp_path, [{"image_id": 1, "category_id": 3, "bbox": [10, 10, -5, 40]}]),
                              tmp_path)
    assert dataset.images == [] and dataset.skipped == {"box_non_positive": 1}


def test_a_category_id_listed_twice_is_refused_naming_both_names(tmp_path):
    """Both names were kept and a box of id 1 scored against one of them: top-1 fell from 100 to 50, silently."""
    categories = [{"id": 1, "name": "red square"}, {"id": 1, "name": "red block"}]
    annotation_file = _coco_file(tmp_path, [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}], categories)
    with pytest.raises(ValueError, match="coco.json: category id 1 is listed twice, as 'red square' and 'red block'"):
        load_coco_boxes(annotation_file, tmp_path)


def test_an_image_id_listed_twice_with_other_file_names_is_refused_naming_both(tmp_path):
    """The later entry won: a.png's boxes were scored on b.png's pixels and a.png left out, silently (two COCO
    files merged without renumbering their ids). The same entry repeated names one image and is read as one."""
    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 64)).save(tmp_path / name)
    annotation_file = _coco_file(tmp_path, [{"image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5]}])
    coco = json.loads(annotation_file.read_text())
    coco["images"].append({"id": 1, "file_name": "b.png"})
    annotation_file.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"coco.json: image id 1 is listed twice, as 'a.png' and 'b.png'"):
        load_coco_boxes(annotation_file, tmp_path)
    coco["images"][1]["file_name"] = "a.png"
    annotation_file.write_text(json.dumps(coco))
    dataset = load_coco_boxes(annotation_file, tmp_path)
    assert [(image.name, image.boxes) for image in dataset.images] == [("a.png", [[1, 1, 6, 6]])]


def test_an_annotation_without_a_category_id_is_skipped_and_counted_not_a_key_error(tmp_path):
    """README: malformed boxes are skipped and counted; an instances annotation or panoptic segment with no
    'category_id' raised KeyError: 'category_id' out of `python -m fineclip_ds.evaluate --task box-cls` (exit 1)."""
    good = {"image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5]}
    missing = [{"image_id": 1, "bbox": [1, 1, 5, 5]}, {"image_id": 1, "segments_info": [{"bbox": [1, 1, 5, 5]}]}]
    dataset = load_coco_boxes(_coco_file(tmp_path, [good, *missing]), tmp_path)
    assert [image.boxes for image in dataset.images] == [[[1, 1, 6, 6]]]
    assert dataset.skipped == {"unknown_category": 2}
