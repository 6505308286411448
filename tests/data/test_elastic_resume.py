"""A webdataset run resumed at another world size or worker count: the records no reader had
delivered are read exactly once, every record equally often, before the new split takes over."""
import itertools
import json
import random
from collections import Counter

import pytest
import torch

from fineclip_ds.data.collate import RegionCollator
from fineclip_ds.data.shapes_world import ShapesWorld
from fineclip_ds.data.stream_positions import readers_per_rank, unit_of
from fineclip_ds.data.streams import WebDatasetStream
from fineclip_ds.data.transforms import RegionTransform
from fineclip_ds.training import checkpoint
from tests.data.helpers import (MEAN, STD, captions, char_tokenizer, defective_records, with_image_written_twice,
                                world_records, write_shard)

# uneven shards so that readers drift apart: at 2 ranks x 2 workers the readers hold 4, 8, 10 and 10
# usable records, and after 6 records each the first is in epoch 1 while the others are still in epoch 0
GOOD_SHARD_SIZES = (2, 6, 3, 7, 2, 4, 5, 2)
USABLE = [f"record {i}" for i in range(sum(GOOD_SHARD_SIZES))] + ["bad boxes"]  # defective_records' usable one
DUPLICATED_SHARD = 3  # also holds, mid-shard, a record with its image written twice: skipped on every read
REPEATED_SHARD = 1  # also holds, mid-shard, a second record with its first record's key: skipped on every read


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("elastic")
    world, first = ShapesWorld(seed=4, image_size=32), 0
    for shard, size in enumerate(GOOD_SHARD_SIZES):
        records = [{**record, "txt": f"record {first + i}"}
                   for i, record in enumerate(world_records(world, range(first, first + size)))]
        if shard == DUPLICATED_SHARD:
            records[size // 2:size // 2] = with_image_written_twice({**records[0], "__key__": "dup", "txt": "dup"})
        if shard == REPEATED_SHARD:
            records.insert(size // 2, {**records[0], "txt": "repeat"})
        write_shard(directory / f"part-{shard}.tar", records + (defective_records() if shard == 7 else []))
        first += size
    (directory / "part-8.tar").write_bytes(b"not a tar archive" * 40)
    return str(directory / "part-{0..8}.tar")


def _stream(shards: str, rank: int, world_size: int, workers: int) -> WebDatasetStream:
    return WebDatasetStream(shards, RegionTransform(32, MEAN, STD), RegionCollator(char_tokenizer, max_boxes=6), 1,
                            rank, world_size, num_workers=workers, seed=3)


def _read(stream: WebDatasetStream, batches: int = 0, through_epoch: int | None = None) -> list[tuple[str, int]]:
    """(record, epoch it belongs to; leftovers count as start_epoch - 1) of one-record batches: `batches`
    of them, or until every reader has begun the epoch after `through_epoch`."""
    workers = readers_per_rank(stream.num_workers)

    def epoch_of(reader: int) -> int:
        return unit_of(stream.leftovers, reader, workers, stream.start_epoch, stream.positions[reader][0])[1]

    read: list[tuple[str, int]] = []
    last = dict(stream.positions)
    for batch in itertools.islice(iter(stream), 1000):
        reader = next(worker for worker, position in stream.positions.items() if last.get(worker) != position)
        last = dict(stream.positions)
        read.append((captions(batch["texts"])[0], epoch_of(reader)))
        if len(read) == batches or through_epoch is not None and len(last) == workers and all(
                epoch_of(worker) > through_epoch for worker in last):
            return read
    raise AssertionError("not there after 1000 batches")


def _write_shards(directory, sizes: list[int]) -> tuple[str, list[str]]:
    """Shards of the given sizes holding "record 0", "record 1", ... in order; (pattern, records)."""
    world, first = ShapesWorld(seed=4, image_size=32), 0
    for shard, size in enumerate(sizes):
        records = world_records(world, range(first, first + size))
        write_shard(directory / f"part-{shard}.tar", [{**record, "txt": f"record {first + i}"}
                                                     for i, record in enumerate(records)])
        first += size
    return str(directory / f"part-{{0..{len(sizes) - 1}}}.tar"), [f"record {i}" for i in range(first)]


def _states(streams: list[WebDatasetStream]) -> list[dict]:
    return [json.loads(json.dumps(stream.state_dict())) for stream in streams]  # as saved, and serialisable


def _resume(shards: str, states: list[dict], world_size: int, workers: int) -> list[WebDatasetStream]:
    """Each new rank is given its own old rank's state and, as checkpoint.load does, every old rank's."""
    streams = [_stream(shards, rank, world_size, workers) for rank in range(world_size)]
    for rank, stream in enumerate(streams):
        stream.load_state_dict({**states[rank % len(states)], "ranks": states})
    return streams


def _run(world_size: int, workers: int, shards: str, batches: int) -> tuple[list[WebDatasetStream], Counter]:
    streams = [_stream(shards, rank, world_size, workers) for rank in range(world_size)]
    return streams, Counter(record for stream in streams for record, _ in _read(stream, batches))


def _finish_epochs(streams: list[WebDatasetStream]) -> tuple[int, Counter, Counter]:
    """(the new split's first epoch, records read before it, records of its first epoch)."""
    start_epoch = streams[0].start_epoch
    assert all(stream.start_epoch == start_epoch for stream in streams)
    read = [item for stream in streams for item in _read(stream, through_epoch=start_epoch)]
    return (start_epoch, Counter(record for record, epoch in read if epoch < start_epoch),
            Counter(record for record, epoch in read if epoch == start_epoch))


@pytest.mark.parametrize("world_size, workers", [(1, 0), (1, 3), (3, 2), (4, 1)])
def test_a_resume_at_another_split_reads_every_undelivered_record_once(shards, world_size, workers):
    old_streams, before = _run(2, 2, shards, batches=12)
    start_epoch, leftovers, next_epoch = _finish_epochs(_resume(shards, _states(old_streams), world_size, workers))
    assert start_epoch == 2  # one old reader had begun epoch 1: every reader finishes it first
    assert before + leftovers == Counter(USABLE * start_epoch)
    assert next_epoch == Counter(USABLE)


def test_a_checkpoint_from_before_re_splitting_can_be_re_split(shards):
    old_streams, before = _run(2, 1, shards, batches=5)
    old_format = [{key: state[key] for key in ("num_workers", "batches", "positions", "world_size")}
                  for state in _states(old_streams)]
    start_epoch, leftovers, next_epoch = _finish_epochs(_resume(shards, old_format, 1, 2))
    assert before + leftovers == Counter(USABLE * start_epoch) and next_epoch == Counter(USABLE)


def test_another_worker_count_needs_only_the_rank_s_own_state(shards):
    start_epochs, next_epoch = [], Counter()
    for rank in range(2):
        old = _stream(shards, rank, 2, 2)
        before = Counter(record for record, _ in _read(old, 12))
        stream = _stream(shards, rank, 2, 1)
        stream.load_state_dict(_states([old])[0])
        read = _read(stream, through_epoch=stream.start_epoch)
        own = Counter(record for record, epoch in read if epoch == stream.start_epoch)  # the rank's records, once
        leftovers = Counter(record for record, epoch in read if epoch < stream.start_epoch)
        assert before + leftovers == Counter({record: stream.start_epoch for record in own})
        start_epochs.append(stream.start_epoch)
        next_epoch += own
    assert start_epochs == [2, 1]  # each rank finishes the furthest epoch its own readers had begun
    assert next_epoch == Counter(USABLE)


def test_a_resume_interrupted_in_its_leftovers_resumes_again(shards):
    old_streams, before = _run(4, 1, shards, batches=6)  # old rank 0 (4 records) is into epoch 1
    middle = _resume(shards, _states(old_streams), 2, 2)
    during = [item for stream in middle for item in _read(stream, batches=3)]
    assert all(epoch == 1 for _, epoch in during)  # all of it leftovers of epochs 0 and 1
    start_epoch, leftovers, next_epoch = _finish_epochs(_resume(shards, _states(middle), 1, 0))
    assert start_epoch == 2
    assert before + Counter(record for record, _ in during) + leftovers == Counter(USABLE * start_epoch)
    assert next_epoch == Counter(USABLE)


def test_inconsistent_positions_are_a_clear_error(shards):
    states = _states(_run(2, 2, shards, batches=2)[0])
    stream = _stream(shards, 0, 1, 0)
    with pytest.raises(ValueError, match="every rank's position is needed"):
        stream.load_state_dict({**states[0], "ranks": states[:1]})
    with pytest.raises(ValueError, match="recorded by rank 1 of 2"):
        stream.load_state_dict({**states[0], "ranks": states[::-1]})
    unknown_reader = {**states[1], "positions": {"0": [0, 1], "5": [1, 1]}}
    with pytest.raises(ValueError, match=r"names readers \[0, 5\] but was recorded with 2 per rank"):
        stream.load_state_dict({**states[0], "ranks": [states[0], unknown_reader]})
    with pytest.raises(ValueError, match="recorded by 2 ranks and this run has 1"):
        stream.load_state_dict(states[0])


def test_checkpoint_load_gives_every_saved_rank_s_stream_state_after_a_change_of_world_size(shards, tmp_path):
    old_streams, before = _run(2, 2, shards, batches=12)
    tag = tmp_path / checkpoint.tag_for_step(12)
    tag.mkdir()
    for rank, stream in enumerate(old_streams):
        torch.save({"step": 12, "stream": stream.state_dict(), "rng": checkpoint.rng_state()},
                   tag / f"trainer_state_rank{rank}.pt")

    class OneRankEngine:  # what load needs of DeepSpeed's engine, in a 1-process run
        global_rank = 0

        def load_checkpoint(self, directory: str, tag: str) -> tuple[str, dict]:
            return directory, {}

        def load_universal_checkpoint(self) -> bool:
            return False

    state = checkpoint.load(OneRankEngine(), checkpoint.ResumePoint(tmp_path, tag.name))
    assert [rank_state["rank"] for rank_state in state["stream"]["ranks"]] == [0, 1]
    stream = _stream(shards, 0, 1, 0)
    stream.load_state_dict(state["stream"])
    start_epoch, leftovers, next_epoch = _finish_epochs([stream])
    assert before + leftovers == Counter(USABLE * start_epoch) and next_epoch == Counter(USABLE)


def test_a_bad_shard_reported_before_a_re_split_is_not_reported_again(shards):
    old_streams = [_stream(shards, rank, 2, 2) for rank in range(2)]
    before = sum(batch["data_stats"].get("bad_shard", 0) for stream in old_streams
                 for batch in itertools.islice(iter(stream), 24))  # every reader is past its first epoch
    assert before == 1  # part-7.tar: 5 of its 7 records are defective
    stream = _resume(shards, _states(old_streams), 1, 2)[0]
    assert sum(batch["data_stats"].get("bad_shard", 0) for batch in itertools.islice(iter(stream), 60)) == 0


@pytest.mark.parametrize("seed", range(8))
def test_random_chains_of_resumes_read_every_record_as_often_as_every_other(tmp_path, seed):
    """Random shard sizes, splits and stops, resumed one to three times (the same split, another worker
    count on the same ranks, or another world size, which checkpoint.load marks by adding every rank's
    state); the last resume re-splits. Each rank's records are then read once more than the epoch its
    new split begins with, whichever ranks read them before."""
    rng = random.Random(seed)
    sizes = [rng.randint(1, 7) for _ in range(rng.randint(4, 9))]
    shards, records = _write_shards(tmp_path, sizes)
    shard_of = {record: shard for shard, size in enumerate(sizes)
                for record in records[sum(sizes[:shard]):sum(sizes[:shard + 1])]}

    def another_split(world_size: int, workers: int, must_differ: bool) -> tuple[int, int]:
        while True:
            candidate = (rng.randint(1, 4), rng.choice([0, 1, 2, 3]))
            if world_size and rng.random() < 0.3:  # another worker count on the same ranks
                candidate = (world_size, candidate[1])
            fits = candidate[0] * readers_per_rank(candidate[1]) <= len(sizes)
            same = (candidate[0], readers_per_rank(candidate[1])) == (world_size, readers_per_rank(workers))
            if fits and not (must_differ and same):
                return candidate

    world_size, workers = another_split(0, 0, must_differ=False)  # 0: no ranks yet
    streams = [_stream(shards, rank, world_size, workers) for rank in range(world_size)]
    earlier = Counter(record for stream in streams for record, _ in _read(stream, rng.randint(1, 15)))
    hops = rng.randint(1, 3)
    for hop in range(hops):
        states = _states(streams)
        world_size, workers = another_split(world_size, workers, must_differ=hop == hops - 1)
        streams = [_stream(shards, rank, world_size, workers) for rank in range(world_size)]
        for rank, stream in enumerate(streams):
            state = states[rank % len(states)]
            stream.load_state_dict(state if len(states) == world_size else {**state, "ranks": states})
        if hop < hops - 1:
            earlier += Counter(record for stream in streams for record, _ in _read(stream, rng.randint(1, 8)))
    last = Counter()  # reads of the last resume up to its new split's first epoch (each rank its own)
    for stream in streams:
        read = _read(stream, rng.randint(1, 8)) + _read(stream, through_epoch=stream.start_epoch)
        last += Counter(record for record, epoch in read if epoch <= stream.start_epoch)
    owner = {record: streams[shard_of[record] % world_size] for record in records}
    assert earlier + last == Counter({record: owner[record].start_epoch + 1 for record in records})
