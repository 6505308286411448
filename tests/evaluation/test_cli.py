"""`python -m fineclip_ds.evaluate` end to end on COCO / Karpathy files the test writes over synthetic images."""
import json
import re
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

import fineclip_ds.models.factory  # noqa: F401  registers the tiny model configs
from fineclip_ds.data.shapes_world import ShapesWorld
from fineclip_ds.evaluate import main, parse_args
from fineclip_ds.evaluation.box_classification import load_coco_boxes

IMAGES = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_data")
    (root / "images").mkdir()
    world = ShapesWorld(seed=9, image_size=96)
    coco = {"images": [], "annotations": [], "categories": [{"id": 10 + i, "name": name} for i, name in enumerate(world.classes)]}
    panoptic = {"images": [], "annotations": [], "categories": coco["categories"]}
    karpathy = {"images": []}
    for index in range(IMAGES):
        sample = world.sample(index)
        file_name = f"{index:03d}.png"
        sample.image.save(root / "images" / file_name)
        coco["images"].append({"id": index, "file_name": file_name, "width": 96, "height": 96})
        panoptic["images"].append({"id": index, "file_name": file_name})
        segments = []
        for box, label in zip(sample.boxes, sample.labels):
            x1, y1, x2, y2 = box
            annotation = {"id": len(coco["annotations"]), "image_id": index, "category_id": 10 + label,
                          "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0}
            coco["annotations"].append(annotation)
            segments.append({"category_id": 10 + label, "bbox": annotation["bbox"], "iscrowd": 0})
        panoptic["annotations"].append({"image_id": index, "segments_info": segments})
        karpathy["images"].append({"filename": file_name, "split": "test", "sentences": [{"raw": sample.caption}]})
    # defects: a crowd box, a box with no area, an image that cannot be read
    coco["annotations"].append({"id": 999, "image_id": 0, "category_id": 10, "bbox": [1, 1, 5, 5], "iscrowd": 1})
    coco["annotations"].append({"id": 998, "image_id": 1, "category_id": 10, "bbox": [5, 5, 0, 9], "iscrowd": 0})
    (root / "images" / "broken.png").write_bytes(b"not a png")
    coco["images"].append({"id": 77, "file_name": "broken.png"})
    coco["annotations"].append({"id": 997, "image_id": 77, "category_id": 11, "bbox": [1, 1, 20, 20], "iscrowd": 0})
    karpathy["images"].append({"filename": "broken.png", "split": "test", "sentences": [{"raw": "nothing"}]})
    karpathy["images"].append({"filename": "000.png", "split": "train", "sentences": [{"raw": "train split"}]})
    (root / "instances.json").write_text(json.dumps(coco))
    (root / "panoptic.json").write_text(json.dumps(panoptic))
    (root / "karpathy.json").write_text(json.dumps(karpathy))
    clip = open_clip.create_model("FineCLIP-ViT-T-8")
    torch.save(clip.state_dict(), root / "weights.pt")
    return root


def _evaluate(data: Path, tmp_path: Path, *args: str) -> dict:
    output = tmp_path / "result.json"
    main(["--checkpoint", str(data / "weights.pt"), "--model", "FineCLIP-ViT-T-8", "--output", str(output),
          "--batch_size", "4", *args])
    return json.loads(output.read_text())


def test_box_classification_from_coco_instances_counts_what_it_skips(data, tmp_path):
    result = _evaluate(data, tmp_path, "--task", "box-cls", "--annotations", str(data / "instances.json"),
                       "--images", str(data / "images"), "--templates", "shapes")
    world = ShapesWorld(seed=9, image_size=96)
    boxes = sum(len(world.sample(i).boxes) for i in range(IMAGES))
    assert result["region_boxes"] == boxes
    assert result["skipped_crowd_box"] == 1 and result["skipped_box_non_positive"] == 1
    assert result["skipped_unreadable_image"] == 1
    for key in ("region_top1", "region_top5", "crop_top1", "crop_top5", "region_top1_overall"):
        assert 0.0 <= result[key] <= 100.0
    assert result["region_top5"] >= result["region_top1"]
    # what decided the numbers is recorded beside them
    assert (result["model"], result["image_size"], result["dtype"]) == ("FineCLIP-ViT-T-8", [64, 64], "float32")
    assert result["settings"] == {"annotations": str(data / "instances.json"), "images": str(data / "images"),
                                  "templates": "shapes", "keep_crowd": False, "min_box_size": 0.0,
                                  "no_crop_baseline": False}


def test_an_images_folder_without_the_annotated_images_says_why_nothing_was_scored(data, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(SystemExit, match=r"no box to classify in 7 images with boxes; skipped: .*'unreadable_image': 7"):
        _evaluate(data, tmp_path, "--task", "box-cls", "--annotations", str(data / "instances.json"),
                  "--images", str(tmp_path / "elsewhere"), "--templates", "shapes")

def test_fineclips_protocol_keeps_crowd_boxes_and_drops_tiny_ones(data, tmp_path):
    coco = {"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 3, "name": "circle"}],
            "annotations": [{"image_id": 1, "category_id": 3, "bbox": bbox, "iscrowd": crowd} for bbox, crowd in
                            (([0, 0, 20, 20], 1), ([0, 0, 5, 5], 0), ([1, 1, 30, 30], 0), ([2, 2, 0, 9], 0))]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    default = load_coco_boxes(tmp_path / "coco.json", tmp_path)
    assert default.images[0].boxes == [[0, 0, 5, 5], [1, 1, 31, 31]]
    assert default.skipped == {"crowd_box": 1, "box_non_positive": 1}  # a zero-width box is not a small one
    fineclip = load_coco_boxes(tmp_path / "coco.json", tmp_path, keep_crowd=True, min_box_size=8)
    assert fineclip.images[0].boxes == [[0, 0, 20, 20], [1, 1, 31, 31]]
    assert fineclip.skipped == {"box_under_min_size": 1, "box_non_positive": 1}
    wired = _evaluate(data, tmp_path, "--task", "box-cls", "--annotations", str(data / "instances.json"),
                      "--images", str(data / "images"), "--templates", "shapes", "--no_crop_baseline",
                      "--keep_crowd", "--min_box_size", "8")
    assert "skipped_crowd_box" not in wired and wired["skipped_box_under_min_size"] >= 1


@pytest.mark.parametrize("annotation,reason", [
    ({"image_id": 1, "category_id": 3}, "box_malformed"),
    ({"image_id": 2, "category_id": 3, "bbox": [0, 0, 5, 5]}, "unknown_image"),  # an image the file does not list
    ({"image_id": 1, "category_id": 3, "bbox": [0, 0, 5]}, "box_malformed"),
])
def test_a_malformed_coco_annotation_is_skipped_and_counted_beside_the_good_ones(tmp_path, annotation, reason):
    """Each aborted the whole evaluation ("malformed COCO annotations (KeyError: 'bbox')")."""
    good = {"image_id": 1, "category_id": 3, "bbox": [1, 1, 10, 10]}
    coco = {"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 3, "name": "circle"}],
            "annotations": [annotation, good]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    loaded = load_coco_boxes(tmp_path / "coco.json", tmp_path)
    assert loaded.images[0].boxes == [[1, 1, 11, 11]] and loaded.skipped == {reason: 1}


def test_panoptic_annotations_give_the_same_boxes(data, tmp_path):
    instances = _evaluate(data, tmp_path, "--task", "box-cls", "--annotations", str(data / "instances.json"),
                          "--images", str(data / "images"), "--templates", "shapes", "--no_crop_baseline")
    panoptic = _evaluate(data, tmp_path, "--task", "box-cls", "--annotations", str(data / "panoptic.json"),
                         "--images", str(data / "images"), "--templates", "shapes", "--no_crop_baseline")
    assert panoptic["region_top1"] == pytest.approx(instances["region_top1"])
    assert panoptic["region_boxes"] == instances["region_boxes"]


def test_retrieval_on_a_karpathy_file(data, tmp_path):
    result = _evaluate(data, tmp_path, "--task", "retrieval", "--annotations", str(data / "karpathy.json"),
                       "--images", str(data / "images"))
    assert result["images"] == IMAGES and result["texts"] == IMAGES and result["skipped_unreadable_image"] == 1
    assert result["merged_duplicate_image_rows"] == 0  # 000.png again, but in the train split
    assert result["captions_truncated"] == 0
    assert result["i2t_r10"] == 100.0 and result["t2i_r10"] == 100.0  # 6 candidates: everything is within 10


def test_results_that_cannot_be_written_are_printed_first(data, tmp_path, capsys, monkeypatch):
    """A full or read-only disk under --output lost a whole evaluation to a traceback, the results unprinted."""
    write_text = Path.write_text

    def full_disk(path: Path, *args, **kwargs):
        if path.name.startswith("result.json"):  # the results file, or the temporary one it is written through
            raise OSError(28, "No space left on device")
        return write_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(SystemExit, match=r"--output .*result.json: cannot write the results \(\[Errno 28\] No space "
                                         r"left on device\); they are printed above"):
        _evaluate(data, tmp_path, "--task", "retrieval", "--annotations", str(data / "karpathy.json"),
                  "--images", str(data / "images"))
    assert json.loads(capsys.readouterr().out)["i2t_r10"] == 100.0


def test_dense_pictures_are_written_beside_the_results(data, tmp_path):
    result = _evaluate(data, tmp_path, "--task", "dense-viz", "--images", str(data / "images"))
    assert len(result["pictures"]) == IMAGES and all(Path(p).is_file() for p in result["pictures"])
    assert result["skipped_unreadable_image"] == 1


def test_dense_pictures_of_images_sharing_a_stem_are_all_kept(data, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("dup.jpg", "dup.png"):
        Image.open(data / "images" / "000.png").save(images / name)
    result = _evaluate(data, tmp_path, "--task", "dense-viz", "--images", str(images))
    assert sorted(Path(p).name for p in result["pictures"]) == ["dup.jpg_dense.png", "dup.png_dense.png"]
    assert all(Path(p).is_file() for p in result["pictures"])


def test_a_missing_input_is_a_clear_exit(data, tmp_path, capsys):
    """Exit 2 with the message on stderr, as argparse's own usage errors; these exited 1, the status of a crash."""
    with pytest.raises(SystemExit, match="needs --annotations") as usage:
        _evaluate(data, tmp_path, "--task", "retrieval", "--images", str(data / "images"))
    assert usage.value.code == 2 and "evaluate: error: --task retrieval needs --annotations" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--model is needed") as usage:  # a bare state dict names no architecture
        main(["--checkpoint", str(data / "weights.pt"), "--task", "world", "--output", str(tmp_path / "r.json")])
    assert usage.value.code == 2
    if not torch.cuda.is_available():  # was a traceback from deep inside torch
        with pytest.raises(SystemExit, match="--device cuda: this machine has no CUDA GPU") as usage:
            _evaluate(data, tmp_path, "--task", "world", "--device", "cuda")
        assert usage.value.code == 2


def test_segmentation_on_a_label_folder_and_at_another_resolution(data, tmp_path):
    world = ShapesWorld(seed=9, image_size=96)
    (tmp_path / "labels").mkdir()
    for index in range(IMAGES):
        world.sample(index).label_map.save(tmp_path / "labels" / f"{index:03d}.png")
    (tmp_path / "classes.txt").write_text("\n".join(world.classes))
    images = tmp_path / "images"
    images.mkdir()
    for index in range(IMAGES):
        (images / f"{index:03d}.png").write_bytes((data / "images" / f"{index:03d}.png").read_bytes())
    common = ("--task", "segmentation", "--images", str(images), "--labels", str(tmp_path / "labels"),
              "--classes", str(tmp_path / "classes.txt"), "--templates", "shapes")
    plain = _evaluate(data, tmp_path, *common)
    assert 0.0 <= plain["miou"] <= 100.0 and 0.0 <= plain["pixel_accuracy"] <= 100.0
    assert plain["classes_scored"] >= 1
    sliding = _evaluate(data, tmp_path, *common, "--slide", "--image_size", "48")
    assert 0.0 <= sliding["miou"] <= 100.0
    shifted = _evaluate(data, tmp_path, *common, "--reduce_zero_label")  # the world's labels read one class lower
    assert 0.0 <= shifted["miou"] <= 100.0 and shifted != plain
    (tmp_path / "no_labels").mkdir()
    with pytest.raises(SystemExit, match=r"no pixel scored; skipped: \{'missing_label': 6"):
        _evaluate(data, tmp_path, *common, "--labels", str(tmp_path / "no_labels"))


def test_segmentation_counts_rgb_and_missing_label_maps_apart_from_unreadable_images(data, tmp_path):
    """An RGB label PNG crashed the metrics (IndexError); a missing label was counted as an unreadable image."""
    world = ShapesWorld(seed=9, image_size=96)
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    for index in range(3):
        (images / f"{index:03d}.png").write_bytes((data / "images" / f"{index:03d}.png").read_bytes())
    world.sample(0).label_map.save(labels / "000.png")
    world.sample(1).label_map.convert("RGB").save(labels / "001.png")  # 002.png: no label map
    (tmp_path / "classes.txt").write_text("\n".join(world.classes))
    result = _evaluate(data, tmp_path, "--task", "segmentation", "--images", str(images), "--labels", str(labels),
                       "--classes", str(tmp_path / "classes.txt"), "--templates", "shapes")
    assert result["skipped_label_not_1_channel"] == 1 and result["skipped_missing_label"] == 1
    assert "skipped_unreadable_image" not in result and 0.0 <= result["miou"] <= 100.0


def test_task_inputs_are_checked_before_the_model_loads(data, tmp_path):
    """A missing or wrong input is named before minutes of checkpoint loading (the checkpoint here is not even read)."""
    common = ["--checkpoint", str(tmp_path / "not_read_yet"), "--output", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit, match="--task box-cls needs --annotations"):
        main([*common, "--task", "box-cls", "--images", str(data / "images")])
    with pytest.raises(SystemExit, match="--images .*instances.json: expected a folder"):
        main([*common, "--task", "dense-viz", "--images", str(data / "instances.json")])
    with pytest.raises(SystemExit, match="--annotations .*images: expected a file"):
        main([*common, "--task", "retrieval", "--annotations", str(data / "images"), "--images", str(data / "images")])
    folder_output = ["--checkpoint", str(tmp_path / "not_read_yet"), "--output", str(data / "images")]
    with pytest.raises(SystemExit, match="--output .*images: is a folder"):  # found only after the evaluation
        main([*folder_output, "--task", "dense-viz", "--images", str(data / "images")])
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match="--output .*a_file/r.json: cannot make its folder"):
        main(["--checkpoint", str(tmp_path / "not_read_yet"), "--output", str(tmp_path / "a_file" / "r.json"),
              "--task", "world"])


@pytest.mark.parametrize("task", ["dense-viz", "segmentation"])
def test_an_empty_images_folder_is_refused_before_the_model_loads(tmp_path, task):
    """dense-viz exited 0 with no pictures; segmentation said 'no pixel scored' only after loading the model."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "classes.txt").write_text("circle\n")
    segmentation_inputs = ["--labels", str(tmp_path / "empty"), "--classes", str(tmp_path / "classes.txt")]
    with pytest.raises(SystemExit, match=f"--images {tmp_path / 'empty'}: no images in {tmp_path / 'empty'}"):
        main(["--checkpoint", str(tmp_path / "not_read_yet"), "--output", str(tmp_path / "r.json"), "--task", task,
              "--images", str(tmp_path / "empty"), *(segmentation_inputs if task == "segmentation" else [])])


@pytest.mark.parametrize("args,message", [
    (["--image_size", "64", "64", "64"], "--image_size: got 3 numbers, expected H or H W"),
    (["--batch_size", "0"], "argument --batch_size: got 0, expected an integer >= 1"),
    (["--max_images", "0"], "argument --max_images: got 0, expected an integer >= 1"),
    (["--world_image_size", "0"], "argument --world_image_size: got 0, expected an integer >= 1"),
])
def test_counts_and_sizes_out_of_range_are_usage_errors(data, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit):
        _evaluate(data, tmp_path, "--task", "world", *args)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("task,option,value", [
    ("box-cls", "--min_box_size", "nan"), ("box-cls", "--min_box_size", "inf"), ("box-cls", "--min_box_size", "-8"),
    ("world", "--world_seed", "-1"),
])
def test_a_number_out_of_range_is_refused_naming_the_option_before_the_model_loads(tmp_path, capsys, task, option,
                                                                                   value):
    """float() took these: --min_box_size nan skipped no box (w * h < nan is false), inf every box, -8 the boxes under
    8 (it is squared); --world_seed -1 failed in numpy after the model loaded ('evaluate: expected non-negative
    integer', no option named)."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--checkpoint", str(tmp_path / "not_read"), "--task", task, option, value])
    assert exit_info.value.code == 2
    assert f"argument {option}: got {value}, expected " in capsys.readouterr().err


def test_the_ends_of_the_number_ranges_are_taken(tmp_path):
    box_cls = parse_args(["--checkpoint", str(tmp_path), "--task", "box-cls", "--min_box_size", "0"])
    world = parse_args(["--checkpoint", str(tmp_path), "--task", "world", "--world_seed", "0"])
    assert (box_cls.min_box_size, world.world_seed) == (0, 0)


@pytest.mark.parametrize("args,message", [
    (["--task", "world", "--templates", "openai"],
     "--templates does not apply to --task world (--task box-cls / segmentation reads it)"),
    (["--task", "box-cls", "--slide"], "--slide does not apply to --task box-cls (--task segmentation reads it)"),
    (["--task", "retrieval", "--world_seed", "3"],
     "--world_seed does not apply to --task retrieval (--task world reads it)"),
    (["--task", "dense-viz", "--annotations", "a.json"],
     "--annotations does not apply to --task dense-viz (--task box-cls / retrieval reads it)"),
])
def test_an_option_the_task_does_not_read_is_refused_not_ignored(tmp_path, capsys, args, message):
    """--task world scored with its 'shapes' templates whatever --templates said."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "not_read"), *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_checkpoint_or_size_that_does_not_fit_the_model_is_a_clear_exit(data, tmp_path):
    torch.save(open_clip.create_model("FineCLIP-ViT-T-16-224").state_dict(), tmp_path / "other.pt")
    with pytest.raises(SystemExit, match=f"{tmp_path / 'other.pt'} does not load into model.name 'FineCLIP-ViT-T-8'"):
        main(["--checkpoint", str(tmp_path / "other.pt"), "--model", "FineCLIP-ViT-T-8", "--task", "world",
              "--output", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit, match=r"model.image_size: got \[65, 65\], expected multiples of .* \[8, 8\]"):
        _evaluate(data, tmp_path, "--task", "world", "--image_size", "65")


def test_a_coco_captions_file_given_for_boxes_or_retrieval_is_named_before_the_model_loads(data, tmp_path):
    coco_captions = {"images": [{"id": 0, "file_name": "000.png"}], "annotations": [{"image_id": 0, "caption": "x"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco_captions))
    inputs = ("--annotations", str(tmp_path / "captions.json"), "--images", str(data / "images"))
    with pytest.raises(SystemExit, match="captions.json: expected a COCO instances or panoptic JSON"):
        main(["--checkpoint", str(tmp_path / "not_read_yet"), "--output", str(tmp_path / "r.json"),
              "--task", "box-cls", *inputs])
    with pytest.raises(SystemExit, match="captions.json: expected a COCO instances or panoptic JSON"):
        _evaluate(data, tmp_path, "--task", "box-cls", *inputs)
    with pytest.raises(SystemExit, match=r"captions.json: expected a Karpathy JSON .* \(KeyError: 'filename'\)"):
        _evaluate(data, tmp_path, "--task", "retrieval", *inputs)


def _export_trained_at(tmp_path: Path, name: str, size: int | list[int]) -> torch.nn.Module:
    """A model trained at `size`, written as export writes it: fineclip.pt and its model config recording the size."""
    trained = open_clip.create_model(name, force_image_size=tuple(size) if isinstance(size, list) else size).eval()
    torch.save(trained.state_dict(), tmp_path / "fineclip.pt")
    model_config = open_clip.get_model_config(name)
    model_config["vision_cfg"]["image_size"] = size
    (tmp_path / "fineclip.json").write_text(json.dumps(model_config))
    return trained


@pytest.mark.parametrize("name,size", [("FineCLIP-ViT-T-8", 96), ("FineCLIP-EVA02-T-14", 56)])
def test_a_model_trained_at_another_size_is_evaluated_at_that_size(tmp_path, name, size):
    """export's model config beside the .pt (as a run's config.json) records the trained size; open_clip's
    pretrained= loading resized a ViT's positional table to the config's size and refused an EVA02's."""
    from fineclip_ds.evaluate import load_for_evaluation

    trained = _export_trained_at(tmp_path, name, size)
    model, _, _ = load_for_evaluation(tmp_path / "fineclip.pt", name)
    assert model.image_size == (size, size)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), trained.encode_image(images, normalize=True))


def test_an_exported_state_dict_names_its_model_through_the_config_beside_it(data, tmp_path):
    """export writes <name>.pt and <name>.json (an open_clip model config): evaluate reads the model from
    the .json as a plain open_clip user would register it; a bare state dict still needs --model."""
    exported = tmp_path / "my_fineclip.pt"
    shutil.copy(data / "weights.pt", exported)
    exported.with_suffix(".json").write_text(json.dumps(open_clip.get_model_config("FineCLIP-ViT-T-8")))
    common = ["--task", "world", "--max_images", "8", "--batch_size", "4", "--world_image_size", "64"]
    main(["--checkpoint", str(exported), *common, "--output", str(tmp_path / "named.json")])
    main(["--checkpoint", str(exported), "--model", "FineCLIP-ViT-T-8", *common,
          "--output", str(tmp_path / "given.json")])
    named, given = (json.loads((tmp_path / name).read_text()) for name in ("named.json", "given.json"))
    assert (named.pop("model"), given.pop("model")) == ("my_fineclip", "FineCLIP-ViT-T-8")  # as registered
    assert named == given


@pytest.mark.parametrize("trained_size,size", [([32, 64], [48, 40]), (96, 64)], ids=["non-square", "square"])
def test_a_model_evaluated_off_its_trained_size_resamples_its_positional_table_from_the_trained_grid(
        tmp_path, trained_size, size):
    """Asked for another --image_size, a model trained at a non-square size had its table read as a square
    (open_clip's resize): 4 x 8 trained rows came out scrambled, or failed to load."""
    from fineclip_ds.evaluate import load_for_evaluation
    from fineclip_ds.models.factory import resample_positional_grid

    name = "FineCLIP-ViT-T-8"
    trained = _export_trained_at(tmp_path, name, trained_size)
    model, _, _ = load_for_evaluation(tmp_path / "fineclip.pt", name, image_size=size)
    pair = (lambda s: (s, s) if isinstance(s, int) else tuple(s))
    assert model.image_size == pair(size)
    trained_grid, grid = [tuple(side // 8 for side in pair(s)) for s in (trained_size, size)]
    expected = resample_positional_grid(trained.visual.positional_embedding, trained_grid, grid)
    torch.testing.assert_close(model.clip.visual.positional_embedding, expected)
    torch.testing.assert_close(model.clip.visual.proj, trained.visual.proj)


def test_a_timm_tower_evaluated_off_its_trained_size_loads_with_its_table_resampled(tmp_path):
    """open_clip's pretrained= loading refused an EVA02 table of another size than the one asked for."""
    from fineclip_ds.evaluate import load_for_evaluation

    name = "FineCLIP-EVA02-T-14"
    trained = _export_trained_at(tmp_path, name, 56)
    model, _, _ = load_for_evaluation(tmp_path / "fineclip.pt", name, image_size=[42, 70])
    assert model.image_size == (42, 70)
    trained.visual.trunk.set_input_size(img_size=(42, 70))  # timm's own resampling of its table
    torch.testing.assert_close(model.clip.visual.trunk.pos_embed, trained.visual.trunk.pos_embed)
    images = torch.randn(2, 3, 42, 70)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), trained.encode_image(images, normalize=True))


@pytest.mark.parametrize("args,bars", [
    (("--task", "box-cls", "--annotations", "instances.json", "--templates", "shapes"), {"box classification": 7}),
    (("--task", "retrieval", "--annotations", "karpathy.json"), {"retrieval: images": 7}),
    (("--task", "dense-viz",), {"dense pictures": 7}),
    (("--task", "world", "--max_images", "4"), {"box classification": 4, "segmentation": 4}),
])
def test_progress_bars_count_towards_a_total(data, tmp_path, capsys, args, bars):
    """A COCO-sized evaluation gives an ETA: box classification showed '4batch', a count without a total."""
    inputs = [str(data / arg) if arg.endswith(".json") else arg for arg in args]
    images = [] if "world" in args else ["--images", str(data / "images")]
    _evaluate(data, tmp_path, *inputs, *images)
    printed = capsys.readouterr().err
    for bar, total in bars.items():
        assert re.search(rf"{bar}: 100%\|.*\| {total}/{total} ", printed), printed[-2000:]


def test_the_world_task_scores_a_run_on_its_own_world_and_records_it(runs, tmp_path):
    """A run trained on another world (data.world_seed / data.world_image_size) was scored on the default
    world's pictures, without a word, unlike its eval/* during training."""
    run = tmp_path / "other_world"
    shutil.copytree(runs["one_zero2"], run)
    config = json.loads((run / "config.json").read_text())
    config["data"].update(world_seed=3, world_image_size=64)
    (run / "config.json").write_text(json.dumps(config))
    common = ["--task", "world", "--max_images", "8", "--batch_size", "4"]
    main(["--checkpoint", str(run), *common, "--output", str(tmp_path / "own.json")])
    main(["--checkpoint", str(runs["one_zero2"]), *common, "--world_seed", "3", "--world_image_size", "64",
          "--output", str(tmp_path / "given.json")])
    own, given = (json.loads((tmp_path / name).read_text()) for name in ("own.json", "given.json"))
    assert (own["world_seed"], own["world_image_size"]) == (3, 64)
    assert own["weights"] == str(run / "checkpoints" / "step_00000004")
    assert {key: value for key, value in own.items() if key not in ("checkpoint", "weights")} == \
        {key: value for key, value in given.items() if key not in ("checkpoint", "weights")}


def test_a_tag_folder_that_is_not_there_is_named_as_the_checkpoint_given(runs, tmp_path):
    """It went on to fail in the model build as 'model.pretrained ...: Directory ... doesn't exist'."""
    missing = runs["one_zero2"] / "checkpoints" / "step_00000003"
    with pytest.raises(SystemExit, match=rf"--checkpoint {missing}: no such checkpoint \(the run folder's latest is "
                                         r"step_00000004\)"):
        main(["--checkpoint", str(missing), "--task", "world", "--output", str(tmp_path / "r.json")])


def test_an_empty_class_list_is_a_clear_exit_not_an_assertion_error(data, tmp_path):
    """README: a missing or wrong input exits 2 with a message. An empty --classes file (segmentation) and a COCO
    file whose 'categories' is [] (box-cls) each ended in a bare AssertionError from open_clip's
    build_zero_shot_classifier (exit 1), after the model had loaded."""
    (tmp_path / "labels").mkdir()
    ShapesWorld(seed=9, image_size=96).sample(0).label_map.save(tmp_path / "labels" / "000.png")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SystemExit) as exit_:
        _evaluate(data, tmp_path, "--task", "segmentation", "--images", str(data / "images"),
                  "--labels", str(tmp_path / "labels"), "--classes", str(tmp_path / "empty.txt"))
    assert exit_.value.code == 2
    coco = json.loads((data / "instances.json").read_text())
    coco["categories"] = []
    (tmp_path / "no_categories.json").write_text(json.dumps(coco))
    with pytest.raises(SystemExit) as exit_:
        _evaluate(data, tmp_path, "--task", "box-cls", "--annotations", str(tmp_path / "no_categories.json"),
                  "--images", str(data / "images"))
    assert exit_.value.code == 2
