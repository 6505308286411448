"""The region-text pipeline end to end on CPU: shards come out in the training format, the training
loader reads them, counts add up, a rerun after a kill resumes without losing or duplicating a sample."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from fineclip_ds.data.captioner import clean_caption
from fineclip_ds.data.collate import RegionCollator
from fineclip_ds.data.make_regions import run
from fineclip_ds.data.pair_sources import folder_units
from fineclip_ds.data.proposals import GridProposer, ProposalFilter
from fineclip_ds.data.shapes_world import ShapesWorld
from fineclip_ds.data.streams import WebDatasetStream
from fineclip_ds.data.transforms import RegionTransform
from tests.data.helpers import MEAN, STD, captions, char_tokenizer

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


def _run(pairs, output_dir: Path, captioner, rank: int = 0, world_size: int = 1):
    units = folder_units(pairs[0], pairs[1], samples_per_shard=4)
    box_filter = ProposalFilter(min_side=0.05, max_area=0.9, score_threshold=0.0, nms_iou=0.7, max_boxes=5)
    return run(units, GridProposer(), box_filter, captioner, "", output_dir, rank, world_size)


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
])
def test_caption_cleaning(raw, prompt, expected):
    assert clean_caption(raw, prompt) == expected
