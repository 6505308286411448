import io
import itertools
import json
import logging
import re
import shutil
import tarfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fineclip_ds.config import ConfigError
from fineclip_ds.data.collate import RegionCollator
from fineclip_ds.data.shapes_world import ShapesWorld
from fineclip_ds.data.streams import SyntheticStream, WebDatasetStream, read_raw_records
from fineclip_ds.data.transforms import RegionTransform
from tests.data.helpers import (MEAN, STD, captions, char_tokenizer, defective_records, with_image_written_twice,
                                world_records, write_shard)

IMAGE_SIZE = 32


def _parts():
    return RegionTransform(IMAGE_SIZE, MEAN, STD), RegionCollator(char_tokenizer, max_boxes=6)


def _synthetic(local_batch: int, rank: int, world_size: int, workers: int = 0) -> SyntheticStream:
    return SyntheticStream(ShapesWorld(seed=1, image_size=48), *_parts(), local_batch, rank, world_size, num_workers=workers)


def _take(stream, count: int) -> list[dict]:
    return list(itertools.islice(iter(stream), count))


def _same_batch(a: dict, b: dict) -> None:
    for key in ("images", "texts", "boxes", "box_mask", "region_texts"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_ranks_split_the_same_global_batch_as_one_process():
    single = _take(_synthetic(4, 0, 1), 2)
    rank0, rank1 = _take(_synthetic(2, 0, 2), 2), _take(_synthetic(2, 1, 2), 2)
    for step in range(2):
        joined_captions = captions(rank0[step]["texts"]) + captions(rank1[step]["texts"])
        assert joined_captions == captions(single[step]["texts"])
        torch.testing.assert_close(torch.cat([rank0[step]["images"], rank1[step]["images"]]), single[step]["images"])


@pytest.mark.parametrize("workers", [0, 2])
def test_synthetic_stream_resumes_at_the_consumed_step_despite_prefetch(workers):
    uninterrupted = _take(_synthetic(3, 0, 1, workers), 5)
    first = _synthetic(3, 0, 1, workers)
    _take(first, 3)
    resumed = _synthetic(3, 0, 1, workers)
    resumed.load_state_dict(first.state_dict())
    for expected, got in zip(uninterrupted[3:], _take(resumed, 2)):
        _same_batch(expected, got)


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    world = ShapesWorld(seed=2, image_size=40)
    for shard in range(4):
        write_shard(tmp_path / f"good-{shard}.tar", world_records(world, range(shard * 5, shard * 5 + 5)))
    write_shard(tmp_path / "good-4.tar", world_records(world, range(20, 22)) + defective_records())
    (tmp_path / "good-5.tar").write_bytes(b"this is not a tar archive" * 40)
    return tmp_path


def _wds(shard_dir: Path, local_batch: int, rank: int = 0, world_size: int = 1, workers: int = 0) -> WebDatasetStream:
    return WebDatasetStream(str(shard_dir / "good-{0..5}.tar"), *_parts(), local_batch, rank, world_size,
                            num_workers=workers, seed=7)


def test_one_epoch_reads_every_good_record_once_and_counts_every_defect(shard_dir):
    # 22 good records + 1 readable record with bad boxes = 23 samples; batches of 23 -> one epoch each
    epoch = _take(_wds(shard_dir, local_batch=23), 2)
    seen = captions(epoch[0]["texts"])
    world = ShapesWorld(seed=2, image_size=40)
    expected = [world.sample(i).caption for i in range(22)] + ["bad boxes"]
    assert sorted(seen) == sorted(expected)
    stats = epoch[0]["data_stats"]
    assert stats["corrupt_image"] == 1 and stats["missing_image"] == 1 and stats["bad_json"] == 1
    assert stats["region_captions_mismatch"] == 1
    assert stats["box_non_positive"] == 1 and stats["box_outside"] == 1 and stats["box_too_small"] == 1
    assert stats["box_not_finite"] == 1 and stats["corrupt_shard"] == 1
    assert stats["samples"] == 23
    bad_boxes_row = seen.index("bad boxes")
    assert epoch[0]["box_mask"][bad_boxes_row].sum() == 1
    assert sorted(captions(epoch[1]["texts"])) == sorted(expected)  # the next epoch, reshuffled, complete again


def test_ranks_and_workers_read_disjoint_shards(shard_dir):
    seen: list[str] = []
    for rank in range(2):
        stream = _wds(shard_dir, local_batch=1, rank=rank, world_size=2, workers=2)
        batches = _take(stream, 24)
        seen += [c for batch in batches for c in captions(batch["texts"])]
    world = ShapesWorld(seed=2, image_size=40)
    assert set(seen) >= {world.sample(i).caption for i in range(22)}


@pytest.mark.parametrize("workers", [0, 2])
def test_webdataset_stream_resumes_exactly(shard_dir, workers):
    uninterrupted = _take(_wds(shard_dir, 4, workers=workers), 9)
    first = _wds(shard_dir, 4, workers=workers)
    _take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints must survive serialisation
    resumed = _wds(shard_dir, 4, workers=workers)
    resumed.load_state_dict(state)
    for expected, got in zip(uninterrupted[5:], _take(resumed, 4)):
        _same_batch(expected, got)


def test_too_few_shards_for_the_readers_is_a_clear_error(shard_dir):
    with pytest.raises(ConfigError, match="6 shards for 4 ranks x 2 workers"):  # launch/pretrain.py: exit 2
        _wds(shard_dir, 2, rank=0, world_size=4, workers=2)


def test_a_shard_pattern_that_names_no_existing_file_is_a_config_error(shard_dir):
    """Not a RuntimeError from every reader in the first step (missing shards among existing ones are skipped)."""
    missing = f"none of its 3 files exists (the first: {shard_dir}/gooood-0.tar)"
    with pytest.raises(ConfigError, match=re.escape(missing)):
        WebDatasetStream(str(shard_dir / "gooood-{0..2}.tar"), *_parts(), 2, 0, 1, num_workers=0)
    WebDatasetStream(str(shard_dir / "good-{4..9}.tar"), *_parts(), 2, 0, 1, num_workers=0)


@pytest.mark.parametrize("pattern", ["", "*.tar"], ids=["folder", "glob"])
def test_a_folder_or_a_glob_given_as_shards_is_told_to_use_braces(shard_dir, pattern):
    """Both read as one missing file: the message said so of a folder that exists."""
    with pytest.raises(ConfigError, match=re.escape("name the files with braces, e.g. shards/part-{000000..000099}.tar")):
        WebDatasetStream(str(shard_dir / pattern) if pattern else str(shard_dir), *_parts(), 2, 0, 1, num_workers=0)


def test_missing_shards_among_existing_ones_are_named_at_start(shard_dir, caplog):
    """They were only met when the epoch reached them, logged as unreadable and counted as corrupt_shard."""
    with caplog.at_level(logging.WARNING, logger="fineclip_ds"):
        stream = WebDatasetStream(str(shard_dir / "good-{0..7}.tar"), *_parts(), 2, 0, 1, num_workers=0)
    assert f"2 of its 8 files do not exist (the first: {shard_dir}/good-6.tar)" in caplog.text
    # left out of the split, where an epoch could give one reader nothing but missing files
    assert stream.shards == [str(shard_dir / f"good-{index}.tar") for index in range(6)]
    with pytest.raises(ConfigError, match="6 shards for 4 ranks x 2 workers"):
        WebDatasetStream(str(shard_dir / "good-{0..7}.tar"), *_parts(), 2, 0, 4, num_workers=2)


def test_synthetic_stream_resumes_at_another_world_size_with_the_next_unseen_samples():
    uninterrupted = _take(_synthetic(4, 0, 1), 3)
    halves = [_synthetic(2, rank, 2) for rank in range(2)]
    for stream in halves:
        _take(stream, 2)
    resumed = _synthetic(4, 0, 1)
    resumed.load_state_dict(halves[0].state_dict())
    _same_batch(_take(resumed, 1)[0], uninterrupted[2])


def test_webdataset_positions_refuse_another_world_size(shard_dir):
    first = _wds(shard_dir, 2, rank=0, world_size=2)
    _take(first, 1)
    with pytest.raises(ValueError, match="recorded by 2 ranks and this run has 1"):
        _wds(shard_dir, 2).load_state_dict(first.state_dict())


def test_positions_refuse_another_shard_list_or_seed_but_not_a_moved_folder(shard_dir):
    first = _wds(shard_dir, 2)
    _take(first, 1)
    state = first.state_dict()
    fewer = WebDatasetStream(str(shard_dir / "good-{0..4}.tar"), *_parts(), 2, 0, 1, num_workers=0, seed=7)
    with pytest.raises(ConfigError, match="data.train_shards: .* 6 shards, .* this run lists 5 shards"):
        fewer.load_state_dict(state)
    reordered = WebDatasetStream([str(shard_dir / f"good-{i}.tar") for i in (1, 0, 2, 3, 4, 5)], *_parts(), 2, 0, 1,
                                 num_workers=0, seed=7)
    with pytest.raises(ConfigError, match="data.train_shards"):
        reordered.load_state_dict(state)
    reseeded = WebDatasetStream(str(shard_dir / "good-{0..5}.tar"), *_parts(), 2, 0, 1, num_workers=0, seed=8)
    with pytest.raises(ConfigError, match="train.seed=8: .* seed 7"):
        reseeded.load_state_dict(state)
    moved = shard_dir / "moved"
    moved.mkdir()
    for shard in shard_dir.glob("good-*.tar"):
        shutil.copy(shard, moved)
    uninterrupted = _take(_wds(shard_dir, 2), 2)
    resumed = _wds(moved, 2)
    resumed.load_state_dict(state)
    _same_batch(_take(resumed, 1)[0], uninterrupted[1])


def test_a_mostly_bad_shard_is_reported_by_name(shard_dir, caplog):
    # good-4.tar: 2 good records, 4 unusable ones (+1 usable with bad boxes) -> 4/7 > 0.1
    with caplog.at_level("WARNING", logger="fineclip_ds"):
        batch = _take(_wds(shard_dir, local_batch=23), 1)[0]
    assert batch["data_stats"]["bad_shard"] == 1
    reports = [r.getMessage() for r in caplog.records if "records unusable" in r.getMessage()]
    assert len(reports) == 1 and "good-4.tar" in reports[0] and "4 of 7" in reports[0]
    assert any("good-5.tar" in r.getMessage() for r in caplog.records)  # the unreadable one, named too


def test_shards_under_the_bad_fraction_are_not_reported(shard_dir):
    stream = WebDatasetStream(str(shard_dir / "good-{0..5}.tar"), *_parts(), 23, 0, 1, num_workers=0, seed=7,
                              max_bad_fraction=0.6)
    assert "bad_shard" not in _take(stream, 1)[0]["data_stats"]


def test_shards_with_no_usable_record_are_a_clear_error_not_an_endless_loop(tmp_path):
    # keys with a dot ("000.png") make webdataset see extensions "png.jpg", "png.txt": nothing is usable
    records = [{**record, "__key__": f"{index:03d}.png"} for index, record in
               enumerate(world_records(ShapesWorld(image_size=32), range(3)))]
    write_shard(tmp_path / "dotted-0.tar", records)
    stream = WebDatasetStream(str(tmp_path / "dotted-0.tar"), *_parts(), 2, 0, 1, num_workers=0)
    with pytest.raises(RuntimeError, match=r"none of the 3 records .* is usable \(\{'missing_image': 3\}\)"):
        _take(stream, 1)


def test_fewer_usable_records_than_a_batch_is_a_clear_error_not_an_endless_loop(tmp_path):
    write_shard(tmp_path / "small-0.tar", world_records(ShapesWorld(image_size=32), range(3)))
    stream = WebDatasetStream(str(tmp_path / "small-0.tar"), *_parts(), 4, 0, 1, num_workers=0)
    with pytest.raises(RuntimeError, match="hold 3 usable records, fewer than one local batch of 4"):
        _take(stream, 1)


def test_an_incomplete_last_batch_rolls_over_so_every_record_is_seen_equally(tmp_path):
    # one shard of 7 records, batches of 4: 7 batches are exactly 4 epochs, each record 4 times
    world = ShapesWorld(seed=3, image_size=32)
    write_shard(tmp_path / "seven-0.tar", world_records(world, range(7)))
    stream = WebDatasetStream(str(tmp_path / "seven-0.tar"), *_parts(), 4, 0, 1, num_workers=0)
    seen = [caption for batch in _take(stream, 7) for caption in captions(batch["texts"])]
    assert sorted(seen) == sorted([world.sample(i).caption for i in range(7)] * 4)


def test_resuming_does_not_count_the_consumed_records_defects_again(shard_dir):
    # good-5.tar is unreadable; its count must appear as often in a resumed run as in an uninterrupted one
    def corrupt_counts(batches: list[dict]) -> int:
        return sum(batch["data_stats"].get("corrupt_shard", 0) for batch in batches)

    uninterrupted = _take(_wds(shard_dir, 4), 12)
    for stop in range(1, 12):
        first = _wds(shard_dir, 4)
        consumed = _take(first, stop)
        resumed = _wds(shard_dir, 4)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert corrupt_counts(consumed + _take(resumed, 12 - stop)) == corrupt_counts(uninterrupted), stop


def _bad_shards(batches: list[dict]) -> int:
    return sum(batch["data_stats"].get("bad_shard", 0) for batch in batches)


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_does_not_report_a_bad_shard_again(shard_dir, workers):
    """good-4.tar is mostly bad: reported once in a run (data/bad_shard), also when the run resumed in
    between. The reported shards were not saved: a resume reported it again in its next epoch (2)."""
    uninterrupted = _bad_shards(_take(_wds(shard_dir, 4, workers=workers), 12))
    assert uninterrupted == 1
    for stop in (2, 4, 6, 9):
        first = _wds(shard_dir, 4, workers=workers)
        consumed = _take(first, stop)
        resumed = _wds(shard_dir, 4, workers=workers)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert _bad_shards(consumed + _take(resumed, 12 - stop)) == uninterrupted, stop


def test_a_checkpoint_without_shard_health_resumes_exactly(shard_dir):
    uninterrupted = _take(_wds(shard_dir, 4), 4)
    first = _wds(shard_dir, 4)
    _take(first, 2)
    state = json.loads(json.dumps(first.state_dict()))
    del state["shard_health"]  # written before shard health was saved
    resumed = _wds(shard_dir, 4)
    resumed.load_state_dict(state)
    for expected, got in zip(uninterrupted[2:], _take(resumed, 2)):
        _same_batch(expected, got)


def test_shards_named_for_the_built_in_world_are_warned_about(caplog):
    """A recipe's shards overridden to data.source=synthetic is legitimate (the bigG GPU benchmark does
    it); a forgotten data.source=webdataset is not: either way the user hears that the shards are not read."""
    from fineclip_ds.config import DataConfig
    from fineclip_ds.training.build import build_train_stream

    config = DataConfig(source="synthetic", train_shards="shards/part-{0..3}.tar", num_workers=0)
    with caplog.at_level("WARNING", logger="fineclip_ds"):
        stream = build_train_stream(config, (32, 32), (MEAN, STD), char_tokenizer, 2, 0, 1, seed=0)
    assert isinstance(stream, SyntheticStream)
    assert any("data.train_shards='shards/part-{0..3}.tar' is not read" in r.getMessage() for r in caplog.records)


def test_the_record_a_truncated_shard_cuts_off_is_dropped_and_counted_not_read_without_its_boxes(tmp_path):
    """Written image, caption, json (an order other writers use), a shard cut in its last json gave a record
    with image and caption only: trained as an image without regions, with nothing counted against it."""
    world = ShapesWorld(seed=3, image_size=32)
    with tarfile.open(tmp_path / "whole.tar", "w") as tar:
        for record in world_records(world, range(3)):
            for extension in ("jpg", "txt", "json"):
                data = record[extension] if isinstance(record[extension], bytes) else record[extension].encode()
                member = tarfile.TarInfo(f"{record['__key__']}.{extension}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    with tarfile.open(tmp_path / "whole.tar") as tar:
        last_json = tar.getmember("000002.json")
    cut = tmp_path / "cut-0.tar"
    cut.write_bytes((tmp_path / "whole.tar").read_bytes()[:last_json.offset_data + 10])
    counts = Counter()
    records = list(read_raw_records([str(cut), str(tmp_path / "whole.tar")], counts))
    assert [(Path(r["__url__"]).name, r["__key__"]) for r in records] == [
        ("cut-0.tar", "000000"), ("cut-0.tar", "000001"),
        ("whole.tar", "000000"), ("whole.tar", "000001"), ("whole.tar", "000002")]
    assert counts["truncated_record"] == 1 and counts["corrupt_shard"] == 1


def _numbered_records(count: int) -> list[dict]:
    """World records captioned "record 0", "record 1", ... so that each one can be told apart."""
    records = world_records(ShapesWorld(seed=3, image_size=32), range(count))
    return [{**record, "txt": f"record {index}"} for index, record in enumerate(records)]


@pytest.mark.parametrize("written", ["image twice", "image three times", "json twice last"])
def test_a_record_holding_a_member_twice_is_skipped_and_counted_and_the_rest_of_its_shard_read(tmp_path, written):
    """webdataset keeps the first of the members and goes on; its error was counted as corrupt_shard and the
    record delivered with whichever image came first (make_regions then retried the shard on every rerun)."""
    a, b, c, d, e = _numbered_records(5)
    duplicated = {"image twice": with_image_written_twice(b),
                  "image three times": [{"__key__": b["__key__"], "jpg": b["jpg"]}, *with_image_written_twice(b)],
                  "json twice last": [b, {"__key__": b["__key__"], "json": b["json"]}]}[written]
    write_shard(tmp_path / "dup-0.tar", [a, *duplicated, c, d])
    write_shard(tmp_path / "next-1.tar", [e])
    counts = Counter()
    records = list(read_raw_records([str(tmp_path / "dup-0.tar"), str(tmp_path / "next-1.tar")], counts))
    assert [record["txt"].decode() for record in records] == ["record 0", "record 2", "record 3", "record 4"]
    assert counts == Counter(duplicate_member=1)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_skipped_duplicate_does_not_shift_the_records_after_a_resume(tmp_path, workers):
    """Resume positions count the records read_raw_records yields: the skipped one is skipped on every read."""
    records = _numbered_records(10)
    write_shard(tmp_path / "dup-0.tar", [records[0], *with_image_written_twice(records[1]), *records[2:5]])
    write_shard(tmp_path / "dup-1.tar", [*records[5:8], *with_image_written_twice(records[8]), records[9]])

    def stream() -> WebDatasetStream:
        return WebDatasetStream(str(tmp_path / "dup-{0..1}.tar"), *_parts(), 3, 0, 1, num_workers=workers, seed=7)

    uninterrupted = _take(stream(), 8)  # 24 samples: 3 epochs of the 8 usable records
    assert Counter(caption for batch in uninterrupted for caption in captions(batch["texts"])) == Counter(
        {f"record {index}": 3 for index in (0, 2, 3, 4, 5, 6, 7, 9)})
    _assert_resumes_give_the_same_batches_and_count(stream, uninterrupted, (1, 2, 3, 5), "duplicate_member")


def _assert_resumes_give_the_same_batches_and_count(stream: Callable[[], WebDatasetStream], uninterrupted: list[dict],
                                                    stops: tuple[int, ...], counter: str) -> None:
    """Stopped after each of `stops` batches and resumed: the rest are the uninterrupted batches, and the skipped
    records' `counter` adds up to the uninterrupted total."""
    def total(batches: list[dict]) -> int:
        return sum(batch["data_stats"].get(counter, 0) for batch in batches)

    for stop in stops:
        first = stream()
        consumed = _take(first, stop)
        resumed = stream()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        rest = _take(resumed, len(uninterrupted) - stop)
        for expected, got in zip(uninterrupted[stop:], rest):
            _same_batch(expected, got)
        assert total(consumed + rest) == total(uninterrupted), stop


def _appended_again(record: dict, index: int) -> dict:
    """`record`'s key written again by a writer rerun that appended to the shard, captioned so it shows if read."""
    return {**record, "txt": f"repeat of record {index}"}


def test_a_record_repeating_a_key_of_its_shard_is_skipped_counted_and_logged_once_per_shard(tmp_path, caplog):
    """A rerun writer appending a.jpg, a.json after d.json raised nothing (the members are not adjacent): the
    key was read twice, so training took that image twice an epoch and make_regions captioned it twice."""
    a, b, c, d, e = _numbered_records(5)
    write_shard(tmp_path / "rerun-0.tar", [a, b, c, d, _appended_again(a, 0), _appended_again(b, 1)])
    write_shard(tmp_path / "next-1.tar", [{**e, "__key__": a["__key__"]}])  # a key is unique per shard only
    shards = [str(tmp_path / "rerun-0.tar"), str(tmp_path / "next-1.tar")]
    counts = Counter()
    with caplog.at_level("WARNING", logger="fineclip_ds"):
        records = list(read_raw_records(shards, counts))
    assert [record["txt"].decode() for record in records] == [f"record {index}" for index in range(5)]
    assert counts == Counter(repeated_key=2)
    logged = [r.getMessage() for r in caplog.records if "an earlier record of this shard" in r.getMessage()]
    assert len(logged) == 1 and f"record {a['__key__']} of {shards[0]}" in logged[0]


def test_a_shard_is_read_on_its_own_so_its_keys_and_a_break_do_not_reach_into_the_next(tmp_path):
    """A shard listed twice is read twice, each read with its own keys; the record a break cut off was merged
    with the next shard's first record of the same key, and that intact record was dropped as truncated."""
    records = _numbered_records(3)
    whole = write_shard(tmp_path / "whole.tar", records)
    with tarfile.open(whole) as tar:
        last_member = tar.getmembers()[-1]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:last_member.offset_data + 10])
    starting_with_the_cut_key = write_shard(tmp_path / "next.tar", records[2:])
    counts = Counter()
    read = list(read_raw_records([str(whole), str(whole), str(cut), str(starting_with_the_cut_key)], counts))
    assert [record["txt"].decode() for record in read] == [f"record {index}" for index in (0, 1, 2, 0, 1, 2, 0, 1, 2)]
    assert counts["truncated_record"] == 1 and counts["repeated_key"] == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_a_skipped_repeated_key_does_not_shift_the_records_after_a_resume(tmp_path, workers):
    """Every read of a shard starts at its first record (a resume skips the records consumed), so the keys seen
    before a position are the same whether the read began at the shard's start or at a resume."""
    records = _numbered_records(10)
    write_shard(tmp_path / "rerun-0.tar", [*records[:3], _appended_again(records[1], 1), *records[3:5]])
    write_shard(tmp_path / "rerun-1.tar", [*records[5:8], _appended_again(records[5], 5),
                                           {**records[8], "__key__": records[0]["__key__"]}, records[9]])

    def stream() -> WebDatasetStream:
        return WebDatasetStream(str(tmp_path / "rerun-{0..1}.tar"), *_parts(), 3, 0, 1, num_workers=workers, seed=7)

    uninterrupted = _take(stream(), 10)  # 30 samples: 3 epochs of the 10 usable records
    assert Counter(caption for batch in uninterrupted for caption in captions(batch["texts"])) == Counter(
        {f"record {index}": 3 for index in range(10)})
    assert sum(batch["data_stats"].get("repeated_key", 0) for batch in uninterrupted) >= 4
    _assert_resumes_give_the_same_batches_and_count(stream, uninterrupted, (1, 2, 3, 5, 7), "repeated_key")


def _many_boxes_records(count: int) -> list[dict]:
    """Records whose 8 boxes each have their own region caption, "box i"."""
    image = io.BytesIO()
    ShapesWorld(image_size=32).sample(0).image.save(image, format="PNG")
    boxes = [[i, i, i + 10, i + 10] for i in range(8)]
    annotation = json.dumps({"boxes": boxes, "region_captions": [f"box {i}" for i in range(8)]})
    return [{"__key__": f"{n:04d}", "png": image.getvalue(), "txt": f"image {n}", "json": annotation}
            for n in range(count)]


def _picked(batches: list[dict]) -> list[tuple[str, ...]]:
    """Per sample, the region captions it kept, in order."""
    picks = []
    for batch in batches:
        slots = batch["box_mask"].shape[1]
        regions = captions(batch["region_texts"].view(-1, batch["region_texts"].shape[-1]))
        for row in range(batch["box_mask"].shape[0]):
            picks.append(tuple(regions[row * slots:row * slots + int(batch["box_mask"][row].sum())]))
    return picks


def test_records_with_more_boxes_than_max_boxes_train_on_a_new_random_pick_each_epoch(tmp_path):
    """FineCLIP's loader picks max_boxes boxes at random at each read; the first ones every epoch would
    leave the rest unused. The pick is repeatable: a resumed stream picks what the uninterrupted one did."""
    write_shard(tmp_path / "many-0.tar", _many_boxes_records(4))

    def stream() -> WebDatasetStream:
        return WebDatasetStream(str(tmp_path / "many-0.tar"), RegionTransform(IMAGE_SIZE, MEAN, STD),
                                RegionCollator(char_tokenizer, max_boxes=3), 4, 0, 1, num_workers=0, seed=5)

    batches = _take(stream(), 6)  # one batch is one epoch
    picks = _picked(batches)
    assert all(len(pick) == 3 and list(pick) == sorted(pick) for pick in picks)  # 3 boxes, in their order
    assert len(set(picks)) > 6  # 24 reads of 4 records: not the same 3 boxes each time
    assert len({box for pick in picks for box in pick}) == 8  # every box gets trained on
    assert all(batch["data_stats"]["box_over_max"] == 4 * 5 for batch in batches)
    first = stream()
    _take(first, 2)
    resumed = stream()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert _picked(_take(resumed, 4)) == picks[8:]
