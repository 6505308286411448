"""The region-text pipeline end to end on CPU: shards come out in the training format, the training
loader reads them, counts add up, a rerun after a kill resumes without losing or duplicating a sample."""
from __future__ import annotations

import argparse
import io
import itertools
import json
import math
from collections import Counter
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from fineclip_ds.data.captioner import clean_caption, new_tokens
from fineclip_ds.data.collate import RegionCollator
from fineclip_ds.data.make_regions import main, output_settings, parse_args, process_slot, record_key, run
from fineclip_ds.data.pair_sources import coco_caption_units, folder_units, webdataset_units
from fineclip_ds.data.proposals import CocoBoxProposer, DetectorMismatch, DetectorProposer, GridProposer, ProposalFilter
from fineclip_ds.data import random_captioners
from fineclip_ds.data.random_captioners import save_random_blip, save_random_blip2, save_random_llava
from fineclip_ds.data.region_annotators import (KEY_CHECK_IMAGES, CaptionedProposals, ReleasedRegionCaptions,
                                              released_region_key)
from fineclip_ds.data.shapes_world import ShapesWorld, encode_training_sample
from fineclip_ds.data.streams import WebDatasetStream
from fineclip_ds.data.transforms import RegionTransform
from tests.data.helpers import MEAN, STD, captions, char_tokenizer, with_image_written_twice, write_shard
from tests.data.tiny_models import save_tiny_detector

IMAGES = 10


class SizeCaptioner:
    """Deterministic stand-in for a VLM: names the crop's size; every 4th crop gets a degenerate output."""

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, crops):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("killed")
        return ["a a a a" if i % 4 == 3 else f"a region of {c.width} by {c.height}" for i, c in enumerate(crops)]


@pytest.fixture
def pairs(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    world = ShapesWorld(seed=4, image_size=64)
    captions = {}
    for index in range(IMAGES):
        world.sample(index).image.save(images / f"{index:03d}.png")
        captions[f"{index:03d}.png"] = world.sample(index).caption
    (images / "broken.png").write_bytes(b"not an image")
    captions["broken.png"] = "x"
    del captions["004.png"]  # an image without a caption
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    return images, tmp_path / "captions.json"


def _run(pairs, output_dir: Path, captioner, rank: int = 0, world_size: int = 1, images_per_call: int = 1):
    """One captioner call per image by default, so that a captioner failing after n calls dies mid-shard."""
    units = folder_units(pairs[0], pairs[1], samples_per_shard=4)
    box_filter = ProposalFilter(min_side=0.05, max_area=0.9, score_threshold=0.0, nms_iou=0.7, max_boxes=5)
    return run(units, CaptionedProposals(GridProposer(), box_filter, captioner), output_dir, rank, world_size,
               images_per_call)


def _read(output_dir: Path) -> list[dict]:
    shards = sorted(str(p) for p in output_dir.glob("regions-*.tar"))
    stream = WebDatasetStream(shards, RegionTransform(32, MEAN, STD), RegionCollator(char_tokenizer, 5), 1, 0, 1,
                              num_workers=0)
    count = json.loads((output_dir / "summary.json").read_text())["images_out"]
    return list(itertools.islice(iter(stream), int(count)))


def test_shards_are_read_by_the_training_loader_and_counts_add_up(pairs, tmp_path):
    summary = _run(pairs, tmp_path / "out", SizeCaptioner())
    assert summary["shards"] == 3  # 11 images in units of 4
    assert summary["images_in"] == IMAGES + 1
    assert summary["corrupt_image"] == 1 and summary["missing_caption"] == 1
    assert summary["images_out"] == summary["images_in"] - summary["corrupt_image"] - summary["missing_caption"]
    assert summary["regions"] + summary["caption_degenerate"] == summary["proposals"]
    batches = _read(tmp_path / "out")
    assert sum(int(batch["box_mask"].sum()) for batch in batches) == summary["regions"]
    world = ShapesWorld(seed=4, image_size=64)
    expected = {world.sample(i).caption for i in range(IMAGES) if i != 4}
    assert {captions(batch["texts"])[0] for batch in batches} == expected
    assert all(c.startswith("a region of") for b in batches for c in captions(b["region_texts"][0]) if c)


def test_a_rerun_after_a_kill_resumes_without_loss_or_duplication(pairs, tmp_path):
    output_dir = tmp_path / "out"
    with pytest.raises(RuntimeError, match="killed"):
        _run(pairs, output_dir, SizeCaptioner(fail_after=5))  # dies inside the second shard
    assert sorted(p.name for p in output_dir.glob("regions-*.tar")) == ["regions-000000.tar"]
    assert list(output_dir.glob("*.tmp"))  # the half-written shard is left under its temporary name
    finished = (output_dir / "regions-000000.tar").stat().st_mtime_ns
    summary = _run(pairs, output_dir, SizeCaptioner())
    assert (output_dir / "regions-000000.tar").stat().st_mtime_ns == finished  # skipped, not redone
    assert summary["shards"] == 3 and summary["images_in"] == IMAGES + 1
    keys = [captions(batch["texts"])[0] for batch in _read(output_dir)]
    assert len(keys) == len(set(keys)) == IMAGES - 1


def test_a_counts_file_left_empty_by_a_crash_does_not_stop_the_rerun(pairs, tmp_path):
    """Counts were written in place, so a crash (or a full disk) could leave one empty; every rerun then stopped
    on a JSONDecodeError naming no file. They are now written atomically, and an unreadable one is no attempt."""
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "regions-000001.json").write_text("")
    summary = _run(pairs, output_dir, SizeCaptioner())
    assert summary["shards"] == 3 and summary["images_in"] == IMAGES + 1
    assert not list(output_dir.glob("*.tmp"))


KILL_AFTER_CALLS = """
import os, signal, sys
from fineclip_ds.data import captioner, make_regions
calls, generate = [0], captioner.TransformersCaptioner.__call__
def dying(self, crops):
    calls[0] += 1
    if calls[0] > int(os.environ["KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return generate(self, crops)
captioner.TransformersCaptioner.__call__ = dying
make_regions.main(sys.argv[1:])
"""


def test_the_cli_killed_with_sigkill_mid_shard_resumes_without_loss_or_duplication(pairs, tmp_path):
    model = save_random_blip(tmp_path / "captioner")
    args = ["--images", str(pairs[0]), "--captions", str(pairs[1]), "--samples_per_shard", "4", "--captioner",
            str(model), "--score_threshold", "0", "--max_boxes", "2", "--output_dir", str(tmp_path / "out"),
            "--images_per_call", "1"]
    root = Path(__file__).resolve().parents[2]
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_CALLS, *args], cwd=root, capture_output=True,
                            env={**os.environ, "KILL_AFTER": "6"})  # one call per image: dies in the 2nd shard
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in (tmp_path / "out").glob("regions-*.tar")] == ["regions-000000.tar"]
    assert list((tmp_path / "out").glob("*.tar.tmp"))
    summary = main(args)
    assert summary["shards"] == 3 and summary["images_in"] == IMAGES + 1 and summary["images_out"] == IMAGES - 1
    keys = [captions(batch["texts"])[0] for batch in _read(tmp_path / "out")]
    assert len(keys) == len(set(keys)) == IMAGES - 1


def test_crops_of_several_images_are_captioned_in_one_call_and_go_back_to_their_images(tmp_path):
    class RecordingCaptioner(SizeCaptioner):
        def __call__(self, crops):
            self.batches = getattr(self, "batches", []) + [len(crops)]
            return super().__call__(crops)

    images = tmp_path / "images"
    images.mkdir()
    world = ShapesWorld(seed=8, image_size=96)
    for index in range(6):  # every image a different size: a caption sent to the wrong image shows
        world.sample(index).image.resize((40 + 12 * index, 90 - 7 * index)).save(images / f"{index}.png")
    (tmp_path / "captions.json").write_text(json.dumps({f"{index}.png": f"picture {index}" for index in range(6)}))
    captioner = RecordingCaptioner()
    box_filter = ProposalFilter(min_side=0.05, max_area=0.9, score_threshold=0.0, nms_iou=0.7, max_boxes=5)
    summary = run(folder_units(images, tmp_path / "captions.json", 10),
                  CaptionedProposals(GridProposer(), box_filter, captioner), tmp_path / "out", images_per_call=3)
    assert captioner.batches == [15, 15]  # two calls of three images' five crops
    assert summary["images_out"] == 6 and summary["regions"] > 0
    for record in wds.WebDataset(str(tmp_path / "out" / "regions-000000.tar"), shardshuffle=False, empty_check=False):
        annotation = json.loads(record["json"])
        for (x1, y1, x2, y2), caption in zip(annotation["boxes"], annotation["region_captions"]):
            width, height = math.ceil(x2) - math.floor(x1), math.ceil(y2) - math.floor(y1)  # the pixels it touches
            assert caption == f"a region of {width} by {height}"


def test_units_split_over_processes_cover_everything_once(pairs, tmp_path):
    for rank in range(2):
        _run(pairs, tmp_path / "out", SizeCaptioner(), rank=rank, world_size=2)
    assert sorted(p.name for p in (tmp_path / "out").glob("regions-*.tar")) == [
        "regions-000000.tar", "regions-000001.tar", "regions-000002.tar"]


@pytest.mark.parametrize("raw,prompt,expected", [
    ("a photo of a red car", "a photo of", ("a red car", None)),
    ("  ", "", (None, "caption_empty")),
    ("the the the the", "", (None, "caption_degenerate")),
    ("a dog on a sofa", "", ("a dog on a sofa", None)),
    ("a photograph of a cat", "a photo", ("a photograph of a cat", None)),  # not an echo: "photo" ends no word
])
def test_caption_cleaning(raw, prompt, expected):
    assert clean_caption(raw, prompt) == expected


DROP_REASONS = ("caption_empty", "caption_degenerate")


LLAVA_PROMPT = random_captioners.LLAVA_PROMPT


@pytest.mark.parametrize("save_model,prompt", [
    (save_random_blip, ""), (save_random_blip, "a photo of"), (save_random_blip2, ""), (save_random_blip2, "a photo of"),
    (save_random_llava, LLAVA_PROMPT)], ids=["blip", "blip-prompt", "blip2", "blip2-prompt", "llava"])
def test_cli_captions_regions_with_a_real_transformers_model(pairs, tmp_path, save_model, prompt):
    model = save_model(tmp_path / "captioner")
    summary = main(["--images", str(pairs[0]), "--captions", str(pairs[1]), "--samples_per_shard", "4",
                    "--captioner", str(model), "--prompt", prompt, "--max_new_tokens", "6", "--batch_size", "3",
                    "--score_threshold", "0", "--max_boxes", "4", "--generate", '{"no_repeat_ngram_size": 1}',
                    "--output_dir", str(tmp_path / "out")])
    assert summary["images_out"] == IMAGES - 1 and summary["proposals"] == 4 * summary["images_out"]
    assert summary["regions"] + sum(summary.get(reason, 0) for reason in DROP_REASONS) == summary["proposals"]
    assert summary["regions"] > 0
    batches = _read(tmp_path / "out")
    assert sum(int(batch["box_mask"].sum()) for batch in batches) == summary["regions"]
    kept = [c for b in batches for c in captions(b["region_texts"][0]) if c]
    echo = " ".join(prompt.replace("<image>", "").split())  # how the prompt decodes
    assert kept and not (echo and any(c.startswith(echo) for c in kept))


def test_only_the_continuation_of_a_prompt_is_decoded():
    prompt = torch.tensor([[5, 4, 4, 7], [5, 4, 4, 7]])
    generated = torch.tensor([[5, 4, 4, 7, 9, 8], [5, 4, 4, 7, 3, 0]])
    assert new_tokens(generated, prompt).tolist() == [[9, 8], [3, 0]]
    unrelated = torch.tensor([[2, 9, 8, 1, 1], [2, 3, 0, 0, 0]])  # an encoder-decoder's output: kept whole
    assert torch.equal(new_tokens(unrelated, prompt), unrelated)
    assert torch.equal(new_tokens(unrelated, None), unrelated)


def test_detector_proposals_from_a_local_weights_file(tmp_path):
    weights = save_tiny_detector(tmp_path / "detector.pt")
    proposer = DetectorProposer(weights, "fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3, device="cpu")
    image = ShapesWorld(seed=1, image_size=96).sample(0).image
    proposals = proposer.propose(image, "0.png")
    assert proposals and all(0 <= score <= 1 for _, score in proposals)
    counts = Counter()
    boxes = ProposalFilter(min_side=0.0, max_area=1.0, score_threshold=0.0, nms_iou=0.5, max_boxes=3)(proposals, 96, 96,
                                                                                                      counts)
    assert not [reason for reason in counts if not reason.startswith("proposal_")]  # a detector's boxes are all well-formed
    assert sum(counts.values()) == len(proposals) - len(boxes)  # the filter's drops are counted by reason
    assert 1 <= len(boxes) <= 3
    assert all(0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 96 for x1, y1, x2, y2 in boxes)


def test_a_detector_checkpoint_of_another_shape_is_a_clear_error(tmp_path):
    weights = save_tiny_detector(tmp_path / "detector.pt", num_classes=3)
    with pytest.raises(DetectorMismatch, match="size mismatch"):
        DetectorProposer(weights, "fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=91, device="cpu")


def test_fineclip_released_files_convert_into_the_training_shards(tmp_path):
    images = tmp_path / "train2017"
    images.mkdir()
    world = ShapesWorld(seed=2, image_size=64)
    names = [f"{index:012d}.jpg" for index in range(3)]
    for index, name in enumerate(names):
        world.sample(index).image.save(images / name)
    coco_images = [{"id": 100 + i, "file_name": name, "width": 64, "height": 64} for i, name in enumerate(names)]
    bboxes = {100: [[10.7, 4.2, 20.5, 30.0], [1.0, 1.0, 2.0, 2.0]],  # the second is under --min_box_size
              101: [[0.0, 0.0, 64.0, 64.0], [5.0, 6.0, 7.0, 8.0]],  # the second has no caption
              102: []}
    annotations = [{"id": n, "image_id": image_id, "bbox": bbox, "category_id": 1}
                   for n, (image_id, bbox) in enumerate((i, b) for i, boxes in bboxes.items() for b in boxes)]
    (tmp_path / "proposals.json").write_text(json.dumps({"images": coco_images, "annotations": annotations}))
    (tmp_path / "captions.json").write_text(json.dumps({"images": coco_images, "annotations": [
        {"id": i, "image_id": 100 + i, "caption": f"picture {i}"} for i in range(3)]}))
    region_captions = {"000000000000.jpg_10_4_20_30.jpg": "a red circle", "000000000000.jpg_1_1_2_2.jpg": "tiny",
                       "000000000001.jpg_0_0_64_64.jpg": "the whole picture"}
    assert released_region_key(names[0], bboxes[100][0]) in region_captions
    (tmp_path / "region_captions.json").write_text(json.dumps(region_captions))
    summary = main(["--images", str(images), "--coco_captions", str(tmp_path / "captions.json"),
                    "--fineclip_proposals", str(tmp_path / "proposals.json"),
                    "--fineclip_region_captions", str(tmp_path / "region_captions.json"),
                    "--min_box_size", "4", "--output_dir", str(tmp_path / "out")])
    assert (summary["images_out"], summary["proposals"], summary["regions"]) == (3, 4, 2)
    assert summary["box_filtered"] == 1 and summary["caption_missing"] == 1
    records = {r["__key__"]: json.loads(r["json"]) for r in wds.WebDataset(
        str(tmp_path / "out" / "regions-000000.tar"), shardshuffle=False, empty_check=False)}
    assert records["000000000000"] == {"boxes": [[10.7, 4.2, 31.2, 34.2]], "region_captions": ["a red circle"]}
    assert records["000000000001"] == {"boxes": [[0.0, 0.0, 64.0, 64.0]], "region_captions": ["the whole picture"]}
    assert records["000000000002"] == {"boxes": [], "region_captions": []}


def test_cli_refuses_missing_or_half_given_inputs_with_a_clear_message(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--images", str(tmp_path), "--output_dir", str(tmp_path / "out")])
    assert "give --captioner" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--images", str(tmp_path), "--fineclip_proposals", "p.json", "--output_dir", str(tmp_path / "out")])
    assert "go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--images", str(tmp_path), "--captioner", "Salesforce/blip2-opt-2.7b", "--output_dir", str(tmp_path)])
    assert "--captioner Salesforce/blip2-opt-2.7b: no such file or directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # 0 images per call would end every shard before its first image
        main(["--images", str(tmp_path), "--captioner", str(tmp_path), "--images_per_call", "0",
              "--output_dir", str(tmp_path / "out")])
    assert "--images_per_call: got 0, expected an integer >= 1" in capsys.readouterr().err


def test_cli_refuses_a_captioner_that_is_not_a_model_before_loading_anything(pairs, tmp_path, capsys):
    images, captions_file = pairs
    common = ["--images", str(images), "--captions", str(captions_file), "--output_dir", str(tmp_path / "out")]
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(SystemExit):  # a file, not a model folder
        main([*common, "--captioner", str(captions_file)])
    assert "expected the folder of a transformers model" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # said before the captioner loads (minutes for BLIP-2), not after
        main([*common, "--captioner", str(tmp_path / "not_a_model"), "--proposals", "coco"])
    assert "--proposals coco needs --coco_instances" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not_a_model: not a transformers image-to-text model"):
        main([*common, "--captioner", str(tmp_path / "not_a_model")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,key", [("000123.jpg", "000123"), ("a.b.PNG", "a_b"), ("frame.0001", "frame_0001"),
                                      ("train2017/1.jpg", "train2017/1")])
def test_record_keys_have_no_dots_for_webdataset(name, key):
    assert record_key(name) == key


def test_names_that_map_to_one_webdataset_key_are_written_once_and_counted(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    world = ShapesWorld(seed=4, image_size=48)
    for index, name in enumerate(["a.b.png", "a_b.png", "c.png"]):
        world.sample(index).image.save(images / name)
    (tmp_path / "captions.json").write_text(json.dumps({name: f"picture {name}" for name in
                                                        ["a.b.png", "a_b.png", "c.png"]}))
    box_filter = ProposalFilter(min_side=0.05, max_area=0.9, score_threshold=0.0, nms_iou=0.7, max_boxes=2)
    summary = run(folder_units(images, tmp_path / "captions.json", 10),
                  CaptionedProposals(GridProposer(), box_filter, SizeCaptioner()), tmp_path / "out")
    assert (summary["images_in"], summary["images_out"], summary["duplicate_key"]) == (3, 2, 1)
    keys = [r["__key__"] for r in wds.WebDataset(str(tmp_path / "out" / "regions-000000.tar"), shardshuffle=False,
                                                 empty_check=False)]
    assert keys == ["a_b", "c"]


@pytest.fixture
def released_files(tmp_path: Path) -> tuple[Path, Path]:
    """A COCO-format proposals JSON with one box on 000000000139.jpg, and that box's released caption."""
    coco = {"images": [{"id": 139, "file_name": "000000000139.jpg"}, {"id": 140, "file_name": "000000000140.jpg"}],
            "annotations": [{"id": 1, "image_id": 139, "bbox": [10, 10, 50, 40], "category_id": 1}]}
    (tmp_path / "proposals.json").write_text(json.dumps(coco))
    (tmp_path / "region_captions.json").write_text(json.dumps({"000000000139.jpg_10_10_50_40.jpg": "a red box"}))
    return tmp_path / "proposals.json", tmp_path / "region_captions.json"


@pytest.mark.parametrize("key", ["000000000139.jpg", "train2017/000000000139.jpg", "000000000139"],
                         ids=["folder", "path", "webdataset"])
def test_coco_annotations_are_found_from_a_file_name_a_path_or_a_webdataset_key(released_files, key):
    proposals, region_captions = released_files
    image = Image.new("RGB", (100, 80))
    assert CocoBoxProposer(proposals).propose(image, key) == [((10, 10, 60, 50), 1.0)]
    counts = Counter()
    assert ReleasedRegionCaptions(proposals, region_captions)([image], [key], counts) == [[([10, 10, 60, 50],
                                                                                          "a red box")]]
    assert counts == {"proposals": 1}


def test_an_image_the_proposals_json_does_not_list_is_counted(released_files):
    counts = Counter()
    assert ReleasedRegionCaptions(*released_files)([Image.new("RGB", (100, 80))], ["000000000141"], counts) == [[]]
    assert counts == {"image_not_in_proposals": 1}


@pytest.mark.parametrize("environ,expected", [
    ({}, (0, 1)),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}, (3, 8)),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}, (5, 16)),
])
def test_each_process_finds_its_slot_from_torchrun_or_slurm(environ, expected):
    rank, world_size, device = process_slot(environ)
    assert (rank, world_size) == expected and device == "cpu"


def test_webdataset_pairs_in_one_output_shard_per_input_shard(tmp_path):
    world = ShapesWorld(seed=5, image_size=48)
    records = [{"__key__": f"{i:04d}", "jpg": encode_training_sample("k", world.sample(i))["jpg"],
                "txt": world.sample(i).caption} for i in range(6)]
    records[2]["jpg"] = b"\xff\xd8 broken"
    write_shard(tmp_path / "pairs-0.tar", records[:3])
    write_shard(tmp_path / "pairs-1.tar", records[3:])
    (tmp_path / "pairs-2.tar").write_bytes((tmp_path / "pairs-1.tar").read_bytes()[:700])  # truncated
    units = webdataset_units(str(tmp_path / "pairs-{0..2}.tar"))
    box_filter = ProposalFilter(min_side=0.05, max_area=0.9, score_threshold=0.0, nms_iou=0.7, max_boxes=3)
    summary = run(units, CaptionedProposals(GridProposer(), box_filter, SizeCaptioner()), tmp_path / "out")
    assert summary["shards"] == 2 and summary["corrupt_image"] == 1 and summary["corrupt_shard"] == 1
    assert summary["unreadable_input_shards"] == 1  # the truncated one, left for a rerun to retry
    assert summary["images_out"] == summary["images_in"] - 1
    keys = [r["__key__"] for r in wds.WebDataset(str(tmp_path / "out" / "regions-{000000..000001}.tar"),
                                                 shardshuffle=False, empty_check=False)]
    assert keys == ["0000", "0001", "0003", "0004", "0005"]


def test_the_throughput_benchmark_runs_its_tiny_size_on_cpu(tmp_path):
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "benchmarks/gpu_make_regions.py", "--size", "tiny", "--images", "4",
                             "--image_size", "64", "--boxes", "3", "--batch_sizes", "2", "8",
                             "--output", str(tmp_path / "b.md")], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in (tmp_path / "b.md").read_text().splitlines() if line.startswith("| BLIP-2 tiny")]
    assert [row.split(" | ")[1:4] for row in rows] == [["2", "3.0", "20"], ["8", "3.0", "20"]]


def test_a_16_bit_grey_image_is_written_scaled_not_clipped_white(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    levels = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(levels).save(images / "deep.png")  # a 16-bit PNG, opened by PIL as "I;16"
    (tmp_path / "captions.json").write_text(json.dumps({"deep.png": "a grey ramp"}))
    box_filter = ProposalFilter(min_side=0.05, max_area=0.9, score_threshold=0.0, nms_iou=0.7, max_boxes=2)
    run(folder_units(images, tmp_path / "captions.json", 10),
        CaptionedProposals(GridProposer(), box_filter, SizeCaptioner()), tmp_path / "out")
    record = next(iter(wds.WebDataset(str(tmp_path / "out" / "regions-000000.tar"), shardshuffle=False,
                                      empty_check=False)))
    written = np.asarray(Image.open(io.BytesIO(record["jpg"])).convert("L"), dtype=np.float64)
    assert np.abs(written - (levels >> 8)).mean() < 2  # JPEG error; clipped, the mean error was ~126


def test_bad_coco_boxes_and_scores_are_dropped_and_counted_not_crashed_on_or_turned_into_other_boxes(tmp_path):
    """A NaN or infinite coordinate used to become a full-width box (max/min clip NaN away); malformed bboxes
    crashed the proposer; reversed, empty or outside boxes vanished without a count."""
    bad = {"nan": [float("nan"), 10, 20, 20], "inf": [10, 10, float("inf"), 20], "huge": [1, 1, 10 ** 400, 5],
           "reversed": [50, 50, -20, -20], "empty": [10, 10, 0, 0], "outside": [500, 500, 10, 10],
           "strings": ["10", "10", "20", "20"], "three": [1, 2, 3], "null": None}
    annotations = [{"id": n, "image_id": 1, "bbox": bbox} for n, bbox in enumerate(bad.values())]
    annotations += [{"id": 97, "image_id": 1, "bbox": [5, 5, 30, 30], "score": None},
                    {"id": 98, "image_id": 1, "bbox": [5, 5, 30, 30], "score": float("nan")},
                    {"id": 99, "image_id": 1, "bbox": [60, 40, 30, 30]}]
    coco = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": annotations}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    box_filter = ProposalFilter(min_side=0.0, max_area=1.0, score_threshold=0.0, nms_iou=0.7, max_boxes=20)
    counts = Counter()
    regions = CaptionedProposals(CocoBoxProposer(tmp_path / "instances.json"), box_filter, SizeCaptioner())(
        [Image.new("RGB", (100, 80))], ["a.jpg"], counts)
    assert regions == [[([60.0, 40.0, 90.0, 70.0], "a region of 30 by 30")]]
    assert counts == {"box_not_finite": 3, "box_non_positive": 2, "box_outside": 1, "box_malformed": 3,
                      "proposal_bad_score": 2, "proposals": 1}


def test_bad_released_bboxes_and_captions_are_dropped_and_counted_not_crashed_on(tmp_path):
    """NaN or infinite bboxes crashed building the caption key (int(nan)), malformed ones unpacking, a caption
    that is not a string .strip(); a reversed bbox (w, h < 0: a positive area) was written for training to drop."""
    bboxes = [[float("nan"), 1, 5, 5], [1, 1, float("inf"), 5], [50, 50, -20, -20], [500, 500, 10, 10],
              ["1", "1", "5", "5"], None, [1, 2, 3], [10, 10, 20, 20], [30, 30, 20, 20]]
    coco = {"images": [{"id": 1, "file_name": "a.jpg"}],
            "annotations": [{"id": n, "image_id": 1, "bbox": bbox} for n, bbox in enumerate(bboxes)]}
    (tmp_path / "proposals.json").write_text(json.dumps(coco))
    (tmp_path / "region_captions.json").write_text(json.dumps({
        "a.jpg_50_50_-20_-20.jpg": "reversed", "a.jpg_500_500_10_10.jpg": "outside",
        "a.jpg_10_10_20_20.jpg": "a box", "a.jpg_30_30_20_20.jpg": 7}))
    counts = Counter()
    annotate = ReleasedRegionCaptions(tmp_path / "proposals.json", tmp_path / "region_captions.json")
    assert annotate([Image.new("RGB", (100, 80))], ["a.jpg"], counts) == [[([10.0, 10.0, 30.0, 30.0], "a box")]]
    assert counts == {"proposals": 9, "box_not_finite": 2, "box_non_positive": 1, "box_outside": 1,
                      "box_malformed": 3, "caption_missing": 1}


@pytest.mark.parametrize("read", [CocoBoxProposer, lambda path: ReleasedRegionCaptions(path, path.parent / "rc.json"),
                                  lambda path: coco_caption_units(path, path.parent, 10)],
                         ids=["instances", "released", "captions"])
def test_coco_files_that_are_not_coco_are_named_and_stray_annotations_skipped_with_a_warning(tmp_path, read, caplog):
    """These were KeyError tracebacks ('annotations', 'file_name', or the stray image id: 7)."""
    (tmp_path / "rc.json").write_text(json.dumps({"a.jpg_1_1_5_5.jpg": "a box"}))
    path = tmp_path / "coco.json"
    expected = "expected a COCO-format JSON object with lists 'images' and 'annotations', got"
    for coco, message in [({"images": []}, f"{expected} ['images']"), ([1, 2], f"{expected} list"),
                          ({"images": [{"id": 1}], "annotations": []}, "images[0] = {'id': 1}; expected")]:
        path.write_text(json.dumps(coco))
        with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
            read(path)
    annotations = [{"id": 1, "image_id": 1, "bbox": [1, 1, 5, 5], "caption": "a picture"},
                   {"id": 2, "image_id": 7, "bbox": [1, 1, 5, 5], "caption": "of nothing"}]
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": annotations}))
    with caplog.at_level("WARNING", logger="fineclip_ds"):
        read(path)
    assert [r.getMessage() for r in caplog.records] == [f"{path}: 1 of 2 annotations name no image the file lists "
                                                        "(or are not objects); skipped"]


def test_region_captions_that_are_not_a_json_object_are_named(released_files):
    proposals, region_captions = released_files
    region_captions.write_text(json.dumps([["000000000139.jpg_10_10_50_40.jpg", "a red box"]]))
    with pytest.raises(ValueError, match=re.escape(f"{region_captions}: expected a JSON object {{region key: "
                                                   "caption}, got list")):  # was AttributeError on .get, per image
        ReleasedRegionCaptions(proposals, region_captions)


def test_captions_that_are_not_text_or_blank_count_as_missing_in_every_file_source(tmp_path):
    """A number or list crashed writing the shard (after its regions were captioned); a blank caption was
    written, for the training loader to drop every record of it."""
    images = tmp_path / "images"
    images.mkdir()
    names = ["a.png", "b.png", "c.png", "d.png", "e.png"]
    for index, name in enumerate(names):
        ShapesWorld(seed=6, image_size=48).sample(index).image.save(images / name)
    coco = {"images": [{"id": n, "file_name": name} for n, name in enumerate(names)],
            "annotations": [{"image_id": 0, "caption": 5}, {"image_id": 0, "caption": " a picture "},
                            {"image_id": 1, "caption": "   "}, {"image_id": 2, "caption": ["a", "list"]},
                            {"image_id": 3}, {"image_id": 4, "caption": "fine"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    (tmp_path / "folder.json").write_text(json.dumps({"a.png": " a picture ", "b.png": "  ", "c.png": ["a", "list"],
                                                      "d.png": None, "e.png": "fine"}))
    box_filter = ProposalFilter(min_side=0.05, max_area=0.9, score_threshold=0.0, nms_iou=0.7, max_boxes=2)
    for name, units in [("coco", coco_caption_units(tmp_path / "captions.json", images, 10)),
                        ("folder", folder_units(images, tmp_path / "folder.json", 10))]:
        summary = run(units, CaptionedProposals(GridProposer(), box_filter, SizeCaptioner()), tmp_path / name)
        assert (summary["images_out"], summary["missing_caption"]) == (2, 3), name
        written = {r["__key__"]: r["txt"] for r in wds.WebDataset(str(tmp_path / name / "regions-000000.tar"),
                                                                   shardshuffle=False, empty_check=False)}
        assert written == {"a": b"a picture", "e": b"fine"}, name
    (tmp_path / "folder.json").write_text(json.dumps([["a.png", "a picture"]]))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'folder.json'}: expected a JSON object {{file: "
                                                   "caption}, got list")):  # was AttributeError on .get
        folder_units(images, tmp_path / "folder.json", 10)


class SubPixelProposer:
    def propose(self, image, key):
        return [((1.5, 1.5, 2.5, 2.5), 1.0), ((10.2, 10.2, 10.4, 10.9), 1.0)]


def test_boxes_under_a_pixel_are_captioned_from_the_pixels_they_touch_not_an_empty_crop():
    """With --min_side 0 such boxes pass the filter; rounding both ends made (1.5, 2.5) an empty crop."""
    seen = []

    def captioner(crops):
        seen.extend(crop.size for crop in crops)
        return ["a small thing"] * len(crops)

    box_filter = ProposalFilter(min_side=0.0, max_area=1.0, score_threshold=0.0, nms_iou=0.7, max_boxes=5)
    regions = CaptionedProposals(SubPixelProposer(), box_filter, captioner)(
        [Image.new("RGB", (32, 32))], ["k"], Counter())
    assert seen == [(2, 2), (1, 1)] and len(regions[0]) == 2  # pixels 1-2 of each side; pixel 10


def _pair_records(count: int) -> list[dict]:
    world = ShapesWorld(seed=5, image_size=48)
    return [{"__key__": f"{i:04d}", "jpg": encode_training_sample("k", world.sample(i))["jpg"],
             "txt": world.sample(i).caption} for i in range(count)]


def test_cli_refuses_a_shard_pattern_naming_files_that_do_not_exist_before_any_work(released_files, tmp_path, capsys):
    """A missing pattern wrote 4 empty shards marked finished (exit 0), so a rerun on the real tars did nothing."""
    proposals, region_captions = released_files
    (tmp_path / "pairs").mkdir()
    write_shard(tmp_path / "pairs" / "1.tar", _pair_records(2))
    common = ["--fineclip_proposals", str(proposals), "--fineclip_region_captions", str(region_captions),
              "--output_dir", str(tmp_path / "out")]
    for pattern, missing in [("nope/{0..3}.tar", "4 of its 4"), ("pairs/{0..3}.tar", "3 of its 4")]:
        with pytest.raises(SystemExit) as stopped:
            main(["--shards", str(tmp_path / pattern), *common])
        assert stopped.value.code == 2
        error = capsys.readouterr().err
        assert f"{missing} files do not exist" in error and str(tmp_path / pattern.replace("{0..3}", "0")) in error
        assert str(tmp_path / "pairs" / "1.tar") not in error
    assert not (tmp_path / "out").exists()


def test_an_unreadable_input_shard_is_counted_but_not_marked_finished_so_a_rerun_retries_it(tmp_path):
    records = _pair_records(6)
    write_shard(tmp_path / "pairs-0.tar", records[:3])
    write_shard(tmp_path / "whole-1.tar", records[3:])
    (tmp_path / "pairs-1.tar").write_bytes((tmp_path / "whole-1.tar").read_bytes()[:700])  # truncated
    box_filter = ProposalFilter(min_side=0.05, max_area=0.9, score_threshold=0.0, nms_iou=0.7, max_boxes=3)

    def make() -> Counter:
        units = webdataset_units(str(tmp_path / "pairs-{0..1}.tar"))
        return run(units, CaptionedProposals(GridProposer(), box_filter, SizeCaptioner()), tmp_path / "out")

    summary = make()
    assert not (tmp_path / "out" / "regions-000001.tar").exists()
    assert (summary["shards"], summary["unreadable_input_shards"], summary["images_out"]) == (1, 1, 3)
    assert summary["corrupt_shard"] == 1
    os.replace(tmp_path / "whole-1.tar", tmp_path / "pairs-1.tar")  # the user puts the real shard there
    summary = make()
    assert (summary["shards"], summary["unreadable_input_shards"], summary["images_out"]) == (2, 0, 6)
    assert summary["corrupt_shard"] == 0


def test_an_input_record_holding_a_member_twice_is_skipped_and_counted_and_its_shard_finished(tmp_path):
    """Its webdataset error was counted as corrupt_shard: the output shard was left for a rerun, which met the
    same record and left it again, unless --keep_readable_part; the record went in with its first image."""
    records = _pair_records(4)
    write_shard(tmp_path / "pairs-0.tar", [records[0], *with_image_written_twice(records[1]), *records[2:]])
    box_filter = ProposalFilter(min_side=0.05, max_area=0.9, score_threshold=0.0, nms_iou=0.7, max_boxes=3)
    units = webdataset_units(str(tmp_path / "pairs-0.tar"))
    summary = run(units, CaptionedProposals(GridProposer(), box_filter, SizeCaptioner()), tmp_path / "out")
    assert (summary["shards"], summary["duplicate_member"], summary["images_in"], summary["images_out"]) == (1, 1, 3, 3)
    assert "corrupt_shard" not in summary and "unreadable_input_shards" not in summary
    keys = [r["__key__"] for r in wds.WebDataset(str(tmp_path / "out" / "regions-000000.tar"), shardshuffle=False)]
    assert keys == ["0000", "0002", "0003"]


def test_an_input_record_repeating_a_key_of_its_shard_is_skipped_and_counted_once_not_as_a_name_clash(tmp_path):
    """A shard a rerun writer appended to (0000 and 0001 again after 0003) fed both copies to make_regions: the
    second was decoded, counted in images_in and then as duplicate_key, the count for two names mapping to one key."""
    records = _pair_records(4)
    appended = [{**record, "txt": "written again"} for record in records[:2]]
    write_shard(tmp_path / "pairs-0.tar", [*records, *appended])
    box_filter = ProposalFilter(min_side=0.05, max_area=0.9, score_threshold=0.0, nms_iou=0.7, max_boxes=3)
    summary = run(webdataset_units(str(tmp_path / "pairs-0.tar")),
                  CaptionedProposals(GridProposer(), box_filter, SizeCaptioner()), tmp_path / "out")
    assert (summary["shards"], summary["repeated_key"], summary["images_in"], summary["images_out"]) == (1, 2, 4, 4)
    assert "duplicate_key" not in summary
    assert json.loads((tmp_path / "out" / "regions-000000.json").read_text())["repeated_key"] == 2
    written = wds.WebDataset(str(tmp_path / "out" / "regions-000000.tar"), shardshuffle=False)
    assert [(r["__key__"], r["txt"].decode()) for r in written] == [(r["__key__"], r["txt"]) for r in records]


def test_keep_readable_part_finishes_an_input_shard_that_stays_truncated(released_files, tmp_path, caplog):
    """Without it a shard whose input is truncated for good was captioned again on every rerun, then thrown away."""
    records = _pair_records(40)
    write_shard(tmp_path / "pairs-0.tar", records[:3])
    write_shard(tmp_path / "whole-1.tar", records[3:])
    whole = (tmp_path / "whole-1.tar").read_bytes()
    (tmp_path / "pairs-1.tar").write_bytes(whole[:len(whole) // 2])  # the second half is lost
    proposals, region_captions = released_files
    cli = ["--shards", str(tmp_path / "pairs-{0..1}.tar"), "--fineclip_proposals", str(proposals),
           "--fineclip_region_captions", str(region_captions), "--output_dir", str(tmp_path / "out")]
    summary = main([*cli, "--keep_readable_part"])  # the first break may be a hiccup: retried, not kept
    assert (summary["shards"], summary["unreadable_input_shards"]) == (1, 1)
    assert "--keep_readable_part" in caplog.text
    assert main(cli)["unreadable_input_shards"] == 1  # not a setting of its own: the reruns are not refused
    summary = main([*cli, "--keep_readable_part"])
    assert summary["shards"] == 2 and summary["partly_read_input_shards"] == 1 and "unreadable_input_shards" not in summary
    assert 3 < summary["images_out"] < 40 and summary["corrupt_shard"] == 1
    assert (tmp_path / "out" / "regions-000001.tar").is_file()
    assert main(cli)["partly_read_input_shards"] == 1  # finished now: a plain rerun skips it


@pytest.fixture
def released_cli(tmp_path: Path) -> list[str]:
    """make_regions arguments converting FineCLIP's released files for 3 images, one output shard each."""
    images = tmp_path / "train2017"
    images.mkdir()
    world = ShapesWorld(seed=2, image_size=64)
    coco_images = [{"id": 100 + i, "file_name": f"{i:012d}.jpg", "width": 64, "height": 64} for i in range(3)]
    for index, image in enumerate(coco_images):
        world.sample(index).image.save(images / image["file_name"])
    annotations = [{"id": i, "image_id": 100 + i, "bbox": [10.7, 4.2, 20.5, 30.0], "category_id": 1} for i in range(3)]
    (tmp_path / "proposals.json").write_text(json.dumps({"images": coco_images, "annotations": annotations}))
    (tmp_path / "captions.json").write_text(json.dumps({"images": coco_images, "annotations": [
        {"id": i, "image_id": 100 + i, "caption": f"picture {i}"} for i in range(3)]}))
    (tmp_path / "region_captions.json").write_text(json.dumps({f"{i:012d}.jpg_10_4_20_30.jpg": "a red circle"
                                                               for i in range(3)}))
    return ["--images", str(images), "--coco_captions", str(tmp_path / "captions.json"), "--samples_per_shard", "1",
            "--fineclip_proposals", str(tmp_path / "proposals.json"),
            "--fineclip_region_captions", str(tmp_path / "region_captions.json"), "--output_dir", str(tmp_path / "out")]


def test_a_rerun_says_how_many_finished_output_shards_it_skipped(released_cli, capsys):
    assert main(released_cli)["shards"] == 3
    capsys.readouterr()
    assert main(released_cli)["shards"] == 3
    assert "regions (rank 0): 3 of 3 output shards already finished" in capsys.readouterr().err


def test_a_rerun_with_settings_that_change_the_output_stops_naming_the_setting_and_both_values(released_cli, capsys,
                                                                                             tmp_path):
    """A rerun with --max_boxes 2 into a folder made with 6 skipped every shard and printed the old summary."""
    main([*released_cli, "--max_boxes", "6"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main([*released_cli, "--max_boxes", "2"])
    assert stopped.value.code == 2
    assert json.loads((tmp_path / "out" / "settings.json").read_text())["max_boxes"] == 6
    error = capsys.readouterr().err
    assert "--max_boxes: 6 in" in error and "2 now" in error and "pick a new --output_dir" in error
    summary = main([*released_cli, "--max_boxes", "6", "--batch_size", "8", "--images_per_call", "2"])  # no change
    assert summary["shards"] == 3


@pytest.mark.parametrize("content,problem", [
    ('{"max_boxes": 6, "min_si', "cannot be read as JSON"),  # cut short
    ("", "cannot be read as JSON"),
    ("\xff\xfe", "cannot be read as JSON"),  # not UTF-8
    ('["max_boxes", 6]', 'holds ["max_boxes", 6], not a JSON object'),
    ("null", "holds null, not a JSON object"),
])
def test_a_rerun_into_a_folder_whose_settings_json_is_broken_stops_naming_the_file(released_cli, capsys, tmp_path,
                                                                                  content, problem):
    """A settings.json cut short or edited by hand ended the rerun in a JSONDecodeError (or, for a list,
    AttributeError) traceback; it stops like the other settings conflicts, naming the file and what to do."""
    main(released_cli)
    settings_file = tmp_path / "out" / "settings.json"
    settings_file.write_bytes(content.encode("latin-1"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(released_cli)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert f"{settings_file}, which records the settings" in error and problem in error
    assert "restore that file, or pick a new --output_dir" in error


FLOAT_OPTIONS = ("min_side", "max_area", "score_threshold", "nms_iou", "min_box_size", "max_box_size")


@pytest.mark.parametrize("option,value", [
    ("--min_side", "nan"), ("--min_side", "1.5"), ("--max_area", "-0.1"), ("--max_area", "inf"),
    ("--score_threshold", "nan"), ("--score_threshold", "2"), ("--nms_iou", "nan"), ("--nms_iou", "-1"),
    ("--min_box_size", "nan"), ("--min_box_size", "inf"), ("--min_box_size", "-1"),
    ("--max_box_size", "nan"), ("--max_box_size", "-5"),
])
def test_cli_refuses_a_float_option_outside_its_range(released_cli, capsys, option, value):
    """float() took these: NaN compares false with every box, so --min_box_size nan dropped every box (as
    box_filtered, no hint why) and --nms_iou nan suppressed none, silently; a fraction above 1 or a negative size
    meant nothing. Refused before any work."""
    with pytest.raises(SystemExit) as stopped:
        parse_args([*released_cli, option, value])
    assert stopped.value.code == 2
    assert f"argument {option}: got {value}, expected" in capsys.readouterr().err


def test_float_options_take_their_defaults_and_the_ends_of_their_ranges(released_cli):
    defaults = parse_args(released_cli)
    given = parse_args([*released_cli, *itertools.chain.from_iterable(
        (f"--{name}", str(getattr(defaults, name))) for name in FLOAT_OPTIONS)])
    assert [getattr(given, name) for name in FLOAT_OPTIONS] == [getattr(defaults, name) for name in FLOAT_OPTIONS]
    ends = parse_args([*released_cli, "--min_side", "1", "--max_area", "0", "--score_threshold", "1", "--nms_iou", "0",
                       "--min_box_size", "0", "--max_box_size", "0"])
    assert [getattr(ends, name) for name in FLOAT_OPTIONS] == [1, 0, 1, 0, 0, 0]


def test_cli_refuses_a_min_box_size_above_the_max_box_size(released_cli, capsys):
    """Every box was dropped, counted as box_filtered with no hint why."""
    with pytest.raises(SystemExit) as stopped:
        parse_args([*released_cli, "--min_box_size", "50", "--max_box_size", "10"])
    assert stopped.value.code == 2
    assert "--min_box_size 50.0 is above --max_box_size 10.0" in capsys.readouterr().err


@pytest.mark.parametrize("option,value", [
    ("--max_boxes", "-1"), ("--samples_per_shard", "0"), ("--samples_per_shard", "-1"), ("--max_new_tokens", "0"),
    ("--max_new_tokens", "-3"), ("--detector_classes", "0"), ("--detector_classes", "-1"),
])
def test_cli_refuses_an_integer_option_below_its_range(released_cli, capsys, option, value):
    """int() took these: --max_boxes -1 kept all but the last box (survivors[:-1]), --samples_per_shard -1 made no
    shard and 0 blamed the captions file (range() arg 3 must not be zero), --max_new_tokens 0 failed in the first
    generate() call after the captioner loaded, --detector_classes -1 in a RuntimeError traceback."""
    with pytest.raises(SystemExit) as stopped:
        parse_args([*released_cli, option, value])
    assert stopped.value.code == 2
    assert f"argument {option}: got {value}, expected an integer >= " in capsys.readouterr().err


def test_max_boxes_0_is_taken_as_no_limit(released_cli):
    assert parse_args([*released_cli, "--max_boxes", "0"]).max_boxes == 0


def test_max_boxes_0_keeps_every_box_on_both_paths(released_files):
    """0 kept every box of the released files (no limit) but none of the proposals (survivors[:0])."""
    counts = Counter()
    proposed = CaptionedProposals(GridProposer(), ProposalFilter(max_boxes=0), _numbered_captions)(
        [Image.new("RGB", (90, 90))], ["k"], counts)
    assert len(proposed[0]) == 14 and counts["proposal_over_max_boxes"] == 0
    released = ReleasedRegionCaptions(*released_files, max_boxes=0)([Image.new("RGB", (100, 80))],
                                                                     ["000000000139.jpg"], Counter())
    assert released == [[([10, 10, 60, 50], "a red box")]]


def _strict_json(text: str) -> dict:
    """As jq or JavaScript read JSON: Infinity and NaN, which Python's json writes by default, are refused."""
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_settings_json_is_valid_json_with_no_box_size_limit_and_an_old_one_holding_infinity_still_resumes(
        released_cli, capsys, tmp_path):
    """--max_box_size defaults to inf, written as Infinity: not JSON, so jq and strict parsers refused settings.json.
    It is written as "inf" (what float() and the option read); a folder made before still resumes, and compares."""
    settings_file = tmp_path / "out" / "settings.json"
    assert main(released_cli)["shards"] == 3
    assert _strict_json(settings_file.read_text())["max_box_size"] == "inf"
    assert main([*released_cli, "--max_box_size", "inf"])["shards"] == 3  # the same setting, given
    settings_file.write_text(settings_file.read_text().replace('"inf"', "Infinity"))  # as the old code wrote it
    capsys.readouterr()
    assert main(released_cli)["shards"] == 3
    assert "3 of 3 output shards already finished" in capsys.readouterr().err
    assert _strict_json(settings_file.read_text())["max_box_size"] == "inf"  # rewritten valid by the resume
    with pytest.raises(SystemExit):
        main([*released_cli, "--max_box_size", "500"])
    assert '--max_box_size: "inf" in' in capsys.readouterr().err


def test_non_finite_values_in_any_setting_are_written_as_text(tmp_path):
    """--max_box_size takes inf (--generate took Infinity and NaN, and the float options "nan", before they were
    checked): each is recorded as the text float() reads back, so the file stays JSON and NaN compares equal."""
    generate = {"temperature": float("nan"), "bad_words": [[float("-inf")]]}
    settings = output_settings(argparse.Namespace(generate=generate, min_side=float("nan"), captioner=None,
                                                  output_dir=Path("out")))
    assert _strict_json(json.dumps(settings)) == {"generate": {"temperature": "nan", "bad_words": [["-inf"]]},
                                                   "min_side": "nan", "captioner": None}


def test_released_captions_keyed_otherwise_are_warned_about_with_an_expected_and_a_present_key(released_cli, tmp_path,
                                                                                               caplog, capsys):
    """Keys with rounded coordinates matched no box: "caption_missing": 3, "regions": 0, and not a word said."""
    def key_warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "region caption key" in r.getMessage()]

    with caplog.at_level("WARNING", logger="fineclip_ds"):
        main([*released_cli, "--output_dir", str(tmp_path / "matching")])
        assert not key_warnings()
        (tmp_path / "region_captions.json").write_text(json.dumps({f"{i:012d}.jpg_11_4_21_30.jpg": "a red circle"
                                                                   for i in range(3)}))  # rounded, not truncated
        summary = main([*released_cli, "--output_dir", str(tmp_path / "rounded")])
    assert (summary["regions"], summary["caption_missing"]) == (0, 3)
    [warning] = key_warnings()
    assert "'000000000000.jpg_10_4_20_30.jpg'" in warning and "'000000000000.jpg_11_4_21_30.jpg'" in warning
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "truncated to integers" in " ".join(capsys.readouterr().out.split())


def test_released_captions_matching_no_key_in_the_first_images_are_warned_about_before_the_run_ends(tmp_path, caplog):
    names = [f"{index}.jpg" for index in range(KEY_CHECK_IMAGES)]
    coco = {"images": [{"id": n, "file_name": name} for n, name in enumerate(names)],
            "annotations": [{"id": n, "image_id": n, "bbox": [1.5, 1, 5, 5]} for n in range(len(names))]}
    (tmp_path / "proposals.json").write_text(json.dumps(coco))
    (tmp_path / "region_captions.json").write_text(json.dumps({"0.jpg_2_1_5_5.jpg": "a box"}))
    annotate = ReleasedRegionCaptions(tmp_path / "proposals.json", tmp_path / "region_captions.json")
    with caplog.at_level("WARNING", logger="fineclip_ds"):
        annotate([Image.new("RGB", (32, 32))] * (len(names) - 1), names[:-1], Counter())
        assert not caplog.records
        annotate([Image.new("RGB", (32, 32))], names[-1:], Counter())
    [warning] = [r.getMessage() for r in caplog.records]
    assert "'0.jpg_1_1_5_5.jpg'" in warning and "'0.jpg_2_1_5_5.jpg'" in warning


def test_the_progress_bar_ends_counting_every_shard_written(pairs, tmp_path, capsys):
    _run(pairs, tmp_path / "out", SizeCaptioner(), images_per_call=4)
    assert re.findall(r"shards=(\d+/\d+)", capsys.readouterr().err)[-1] == "3/3"  # was 2/3


def test_the_random_captioner_cli_saves_a_model_make_regions_captions_with(pairs, tmp_path, capsys):
    """Building the offline captioner took a Python call to save_random_blip2; there was no command."""
    model = random_captioners.main(["--kind", "blip2", "--size", "tiny", "--output", str(tmp_path / "blip2")])
    printed = capsys.readouterr().out
    assert model == tmp_path / "blip2" and f"--captioner {model}" in printed
    suggested = shlex.split(printed.split("use it as make_regions ")[1])  # with the options it needs
    summary = main(["--images", str(pairs[0]), "--captions", str(pairs[1]), *suggested,
                    "--score_threshold", "0", "--max_boxes", "2", "--max_new_tokens", "4",
                    "--output_dir", str(tmp_path / "out")])
    assert summary["images_out"] == IMAGES - 1 and summary["proposals"] == 2 * summary["images_out"]
    assert summary["regions"] > 0  # without the suggested --generate, random weights' captions were all degenerate
    with pytest.raises(SystemExit) as stopped:
        random_captioners.main(["--kind", "blip", "--size", "opt-2.7b", "--output", str(tmp_path / "blip")])
    assert stopped.value.code == 2 and "--kind blip comes in one size: tiny" in capsys.readouterr().err


def test_every_shard_of_a_list_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    """Only the first of a '::'-separated --shards list was made absolute: a rerun from another folder was refused."""
    monkeypatch.chdir(tmp_path)
    settings = output_settings(argparse.Namespace(shards="a/0.tar::b/1.tar", captioner=None, output_dir=Path("out")))
    assert settings["shards"] == f"{tmp_path}/a/0.tar::{tmp_path}/b/1.tar"


def _numbered_captions(crops):
    return [f"thing number {index}" for index in range(len(crops))]


def test_crowd_boxes_of_coco_proposals_are_counted_not_dropped_silently(tmp_path):
    coco = {"images": [{"id": 1, "file_name": "a.jpg"}],
            "annotations": [{"image_id": 1, "bbox": [10, 10, 30, 30], "iscrowd": 1},
                            {"image_id": 1, "bbox": [50, 50, 30, 30], "iscrowd": 0}]}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    annotate = CaptionedProposals(CocoBoxProposer(tmp_path / "instances.json"), ProposalFilter(0.0, 1.0, 0.0, 0.7, 10),
                                  _numbered_captions)
    counts = Counter()
    regions = annotate([Image.new("RGB", (100, 100))], ["a.jpg"], counts)
    assert len(regions[0]) == 1
    assert counts["crowd_box"] == 1  # was: the crowd box vanished without a count


def test_proposals_the_filter_removes_are_counted():
    """14 grid proposals, max_boxes=5: the 9 the filter drops must show up in the counts (the released-captions
    path counts its filtered boxes as box_filtered; the captioned path counted nothing)."""
    annotate = CaptionedProposals(GridProposer(), ProposalFilter(max_boxes=5), _numbered_captions)
    counts = Counter()
    regions = annotate([Image.new("RGB", (90, 90))], ["k"], counts)
    assert len(regions[0]) == 5
    dropped = sum(count for reason, count in counts.items() if reason.startswith("proposal_"))
    assert dropped == 14 - 5


def test_caption_rows_whose_image_is_missing_are_counted(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (20, 20)).save(images / "a.jpg")
    (tmp_path / "captions.json").write_text(json.dumps({"a.jpg": "a cat", "b.jpg": "a dog"}))
    counts = Counter()
    pairs = [pair for unit in folder_units(images, tmp_path / "captions.json", 10) for pair in unit(counts)]
    readable = [pair for pair in pairs if pair.image is not None]
    assert [pair.key for pair in readable] == ["a.jpg"]
    # b.jpg's caption row must not vanish: it is an unreadable (missing) image, as a COCO captions source counts it
    assert len(pairs) == 2 and any(pair.key == "b.jpg" and pair.image is None for pair in pairs)


@pytest.mark.parametrize("suffix, text", [(".tsv", "a.jpg\ta cat\nb.jpg\ta dog\n"),
                                          (".json", json.dumps({"a.jpg": "a cat", "b.jpg": "a dog"}))])
def test_a_captions_file_that_starts_with_a_byte_order_mark_captions_its_first_image(tmp_path, suffix, text):
    """Excel and Notepad write UTF-8 with a BOM: the first TSV row's file name began with it, so its image went
    uncaptioned (missing_caption) beside a phantom '\\ufeffa.jpg' counted as corrupt; a JSON one was refused."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (20, 20)).save(images / name)
    (tmp_path / f"captions{suffix}").write_bytes(("\ufeff" + text).encode("utf-8"))
    pairs = [pair for unit in folder_units(images, tmp_path / f"captions{suffix}", 10) for pair in unit(Counter())]
    assert [(pair.key, pair.image is not None, pair.caption) for pair in pairs] == [("a.jpg", True, "a cat"),
                                                                                    ("b.jpg", True, "a dog")]


@pytest.mark.parametrize("version, keyword", [("4.40.0", "torch_dtype"), ("4.56.0", "dtype"), ("5.24.0", "dtype")])
def test_the_captioner_names_its_dtype_as_the_installed_transformers_reads_it(tmp_path, monkeypatch, version,
                                                                             keyword):
    """transformers before 4.56 takes `torch_dtype`: given `dtype`, it loaded fp32 weights that the bf16 inputs then
    failed to multiply, on a GPU only (the GPU image's transformers is not pinned)."""
    import transformers

    from fineclip_ds.data.captioner import TransformersCaptioner

    model = save_random_blip(tmp_path / "captioner")
    seen = {}
    load = transformers.AutoModelForImageTextToText.from_pretrained

    def recording(path, **kwargs):
        seen.update(kwargs)
        return load(path, dtype=next(iter(kwargs.values())))

    monkeypatch.setattr(transformers, "__version__", version)
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", recording)
    TransformersCaptioner(str(model), device="cpu")
    assert seen == {keyword: torch.float32}


@pytest.mark.parametrize("arch,num_classes,expected", [
    ("fasterrcnn_mobilenet_v3_large_320_fpn", "91", "--detector_classes"),  # the file's head has 3 classes
    ("fasterrcnn_mobilenet_v3", "3", "--detector_arch"),  # no such torchvision model
    ("resnet50", "3", "--detector_arch"),  # a torchvision model, not a detector
])
def test_cli_a_detector_that_does_not_fit_its_weights_is_a_clear_exit(pairs, tmp_path, capsys, arch, num_classes,
                                                                       expected):
    """README: `--detector_classes` must match its head. A mismatch escaped `python -m fineclip_ds.data.make_regions`
    as a RuntimeError traceback (size mismatch ... exit 1); a typo'd or non-detector --detector_arch as ValueError
    ('Unknown model') or TypeError ('unexpected keyword argument weights_backbone'), while a missing
    --detector_weights or --captioner exits 2 with a message."""
    weights = save_tiny_detector(tmp_path / "detector.pt", num_classes=3)
    captioner = save_random_blip2(tmp_path / "captioner")
    with pytest.raises(SystemExit) as exit_info:
        main(["--images", str(pairs[0]), "--captions", str(pairs[1]), "--proposals", "detector",
              "--detector_arch", arch, "--detector_weights", str(weights), "--detector_classes", num_classes,
              "--captioner", str(captioner), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_cli_a_typo_in_generate_is_a_clear_exit(pairs, tmp_path, capsys):
    """`--generate '{"num_beamz": 3}'` escaped as transformers' ValueError traceback ("The following `model_kwargs`
    are not used by the model: ['num_beamz']", exit 1) from the first generate call, after the captioner had
    loaded and a shard had been opened; other bad arguments exit 2 with a message naming the option."""
    captioner = save_random_blip2(tmp_path / "captioner")
    with pytest.raises(SystemExit) as exit_info:
        main(["--images", str(pairs[0]), "--captions", str(pairs[1]), "--proposals", "grid",
              "--captioner", str(captioner), "--generate", '{"num_beamz": 3}', "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "--generate" in capsys.readouterr().err


@pytest.mark.parametrize("text,problem", [
    ('{"temperature": NaN}', "NaN"), ('{"length_penalty": Infinity}', "Infinity"),
    ('{"bad_words_ids": [[-Infinity]]}', "-Infinity"), ('{"repetition_penalty": 1e999}', "1e999"),
    ('{"num_beams": 3', "not JSON"),
])
def test_cli_refuses_generate_settings_that_are_not_finite_json(released_cli, capsys, text, problem):
    """json.loads took NaN, Infinity and 1e999 (read as inf) and handed them to generate(); JSON has no such numbers.
    JSON cut short was refused as argparse's bare 'invalid loads value'."""
    with pytest.raises(SystemExit) as stopped:
        parse_args([*released_cli, "--generate", text])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "argument --generate: " in error and problem in error and "expected a JSON object" in error


def test_finite_generate_settings_are_read(released_cli):
    text = '{"num_beams": 3, "repetition_penalty": 1.5, "bad_words_ids": [[-2]]}'
    assert parse_args([*released_cli, "--generate", text]).generate == json.loads(text)


@pytest.mark.parametrize("option,content", [
    ("--captions", '[{"image": "000.png", "caption": "a red circle"}]'),  # the retrieval list format
    ("--captions", '{"000.png": "a red'),  # cut short
    ("--coco_captions", '[{"image": "000.png", "caption": "a red circle"}]'),
])
def test_cli_a_captions_file_of_the_wrong_shape_is_a_clear_exit(pairs, tmp_path, capsys, option, content):
    """These ended in a ValueError / JSONDecodeError traceback from pair_sources (exit 1), while a missing --captions
    file exits 2 with 'make_regions.py: error: --captions ...'."""
    (tmp_path / "wrong.json").write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["--images", str(pairs[0]), option, str(tmp_path / "wrong.json"), "--proposals", "grid",
              "--captioner", str(tmp_path), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert option in capsys.readouterr().err
