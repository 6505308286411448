"""Endless, resumable per-rank batch streams: the built-in shapes world and webdataset shards.

Both yield collated batches forever (epochs are an accounting detail at this scale) and expose
state_dict()/load_state_dict() describing the batches the trainer has consumed, not the ones
workers have prefetched, so a resumed run continues exactly where the checkpoint was taken.
"""
from __future__ import annotations

import itertools
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from fineclip_ds.config import ConfigError
from fineclip_ds.data.collate import RegionCollator, TransformedSample, pick_boxes
from fineclip_ds.data.records import decode_record
from fineclip_ds.data.shapes_world import ShapesWorld
from fineclip_ds.data.stream_positions import (Piece, check_ranks, normalized, reader_shards, readers_per_rank,
                                             resplit, shard_list_fingerprint, unit_of)
from fineclip_ds.data.transforms import RegionTransform
from fineclip_ds.data.workers import leave_stop_signals_to_the_trainer
from fineclip_ds.run_logging import PER_RANK

log = logging.getLogger("fineclip_ds")


class _WorldSamples(Dataset):
    def __init__(self, world: ShapesWorld, transform: RegionTransform):
        self.world = world
        self.transform = transform

    def __getitem__(self, index: int) -> TransformedSample:
        sample = self.world.sample(index)
        image, boxes, kept, drops = self.transform(sample.image, sample.boxes)
        return TransformedSample(image, sample.caption, boxes, [sample.region_captions[i] for i in kept], drops,
                                 self.transform.crop_source(sample.image))


class SyntheticStream:
    """Each step draws the next global batch of world indices; rank r of w with local batch b takes
    next_sample + r*b + [0, b), then next_sample advances by w*b on every rank.

    The concatenation of all ranks' batches is then the same global batch whatever w is (a 2-process
    run is comparable to a 1-process run with twice the local batch), and the position is one global
    number, so a run resumed at another world size continues with the next unseen sample.
    """

    def __init__(self, world: ShapesWorld, transform: RegionTransform, collator: RegionCollator, local_batch: int,
                 rank: int, world_size: int, num_workers: int = 1):
        self.world, self.transform, self.collator = world, transform, collator
        self.local_batch, self.rank, self.world_size = local_batch, rank, world_size
        self.num_workers = num_workers
        self.next_sample = 0

    def state_dict(self) -> dict[str, Any]:
        return {"next_sample": self.next_sample}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_sample = int(state["next_sample"])

    def _batch_indices(self, start_sample: int) -> Iterator[list[int]]:
        global_batch = self.local_batch * self.world_size
        for step in itertools.count():
            first = start_sample + step * global_batch + self.rank * self.local_batch
            yield list(range(first, first + self.local_batch))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = DataLoader(_WorldSamples(self.world, self.transform), batch_sampler=self._batch_indices(self.next_sample),
                            num_workers=self.num_workers, collate_fn=self.collator,
                            worker_init_fn=leave_stop_signals_to_the_trainer)
        for batch in loader:
            self.next_sample += self.local_batch * self.world_size
            yield batch


class DataError(RuntimeError):
    """Shards that cannot make a batch. Raised in a DataLoader worker, it reaches the main process again
    as a DataError whose message is the worker's whole traceback; `reason` is the message alone."""

    def reason(self) -> str:
        last_line = str(self).rstrip().splitlines()[-1]
        return last_line.removeprefix(f"{DataError.__module__}.{DataError.__qualname__}: ")


def _pattern_hint(shards: list[str]) -> str:
    """What to write instead, when the pattern is a folder or a shell glob (webdataset expands braces only)."""
    if any(Path(shard).is_dir() or any(char in shard for char in "*?[") for shard in shards):
        return "; a folder or a glob (*) is not expanded: name the files with braces, e.g. shards/part-{000000..000099}.tar"
    return ""


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def missing_local_shards(shards: list[str]) -> list[str]:
    """The local files among `shards` that do not exist; remote URLs are left to the read."""
    return [shard for shard in shards if is_local(shard) and not Path(shard).is_file()]


def expand_shard_urls(urls: str | list[str]) -> list[str]:
    """Brace patterns ("shards-{000000..000009}.tar") and '::'-separated lists -> shard URLs."""
    from webdataset.shardlists import expand_urls

    patterns = [urls] if isinstance(urls, str) else list(urls)
    return [url for pattern in patterns for url in expand_urls(pattern)]


def _is_duplicate_member(error: Exception) -> bool:
    """webdataset's grouping raises this ValueError for a record holding a member twice ("000123.jpg" written
    again), then keeps the first and goes on with that record: the shard itself reads on."""
    return isinstance(error, ValueError) and "duplicate file name" in str(error.args[0] if error.args else "")


def read_raw_records(shards: list[str], counts: Counter) -> Iterator[dict[str, Any]]:
    """The raw records of `shards` in order, each shard read on its own (`_shard_records`), so that what one
    shard holds never reaches into the next: a record cut off by a failure is not merged with the next shard's
    first record of the same key, and a shard listed twice is read twice, each read with its own keys."""
    for shard in shards:
        yield from _shard_records(shard, counts)


def _shard_records(shard: str, counts: Counter) -> Iterator[dict[str, Any]]:
    """The raw records of one shard; a read that breaks off (unreadable or truncated data) is logged and counted
    once in counts["corrupt_shard"], though webdataset reports the failure at two levels. A record yielded after
    the shard failed was cut off by the failure (webdataset yields the files it had): it is dropped and counted
    as truncated_record. A record holding a member twice
    is dropped and counted as duplicate_member (which of the two is right is unknown). A record whose key an
    earlier record of the shard had (a writer rerun that appended a.jpg ... d.json, a.jpg, a.json) is dropped
    and counted as repeated_key, the first logged: read on, the image would train twice an epoch. All are
    dropped the same way on every read of the shard, which starts at its first record, so positions (counts
    of the records yielded) stay exact."""
    import webdataset as wds

    broke, failed, duplicate = False, False, ""  # duplicate: webdataset's message for the record it yields next
    seen_keys: set[str] = set()
    repeats = 0

    def count_and_continue(error: Exception) -> bool:
        nonlocal broke, failed, duplicate
        if _is_duplicate_member(error):
            duplicate = duplicate or str(error.args[0])
            return True
        if not failed:  # the tar reader's error, then the same one again from the shard level with the url added
            counts["corrupt_shard"] += 1
            log.warning("skipping unreadable shard data: %s", error, extra=PER_RANK)  # its message names the shard
        failed = True
        broke = broke or shard in error.args  # webdataset adds the url when the shard itself broke off
        return True

    for record in wds.WebDataset([shard], shardshuffle=False, nodesplitter=None, workersplitter=None,
                                 handler=count_and_continue, empty_check=False):
        record_duplicate, duplicate = duplicate, ""
        key = record["__key__"]
        repeated = key in seen_keys
        seen_keys.add(key)
        if broke:
            counts["truncated_record"] += 1
        elif record_duplicate:
            counts["duplicate_member"] += 1
            log.warning("skipping record %s of %s: %s", key, shard, record_duplicate, extra=PER_RANK)
        elif repeated:
            counts["repeated_key"] += 1
            repeats += 1
            if repeats == 1:  # a shard written twice over repeats thousands of keys: one line per read of it
                log.warning("skipping record %s of %s: an earlier record of this shard has that key (a writer rerun "
                            "that appended to it?); further repeats in this read of it are counted as repeated_key, "
                            "not logged", key, shard, extra=PER_RANK)
        else:
            yield record


class ShardHealth:
    """Names the shards where more than `max_bad_fraction` of the records were unusable, once each.

    Records arrive shard after shard, so a shard is judged when the next one starts (or the epoch ends).
    state() is what a resume needs to judge and report as an uninterrupted run would: the shard being read
    with its counts so far, and the shards reported, as indices into `shards` (the data may move folder).
    """

    def __init__(self, max_bad_fraction: float, shards: list[str], state: list | None = None):
        self.max_bad_fraction, self.shards = max_bad_fraction, shards
        self.index = {shard: i for i, shard in enumerate(shards)}
        current, self.records, self.bad, reported = state or (None, 0, 0, [])
        self.current: str | None = None if current is None else shards[current]
        self.reported: set[str] = {shards[index] for index in reported}

    def state(self) -> list:
        current = self.index.get(self.current) if self.current is not None else None
        return [current, self.records if current is not None else 0, self.bad if current is not None else 0,
                sorted(self.index[shard] for shard in self.reported if shard in self.index)]

    def record(self, shard: str, usable: bool) -> Counter:
        verdict = Counter()
        if shard != self.current:
            verdict = self.finish()
            self.current = shard
        self.records += 1
        self.bad += 0 if usable else 1
        return verdict

    def finish(self) -> Counter:
        """Judge the shard read so far; returns {"bad_shard": 1} when it is reported."""
        shard, records, bad = self.current, self.records, self.bad
        self.current, self.records, self.bad = None, 0, 0
        if shard is None or records == 0 or bad / records <= self.max_bad_fraction or shard in self.reported:
            return Counter()
        self.reported.add(shard)
        log.warning("shard %s: %d of %d records unusable (more than data.max_bad_fraction=%.2f)",
                    shard, bad, records, self.max_bad_fraction, extra=PER_RANK)
        return Counter(bad_shard=1)


class _ShardBatches(IterableDataset):
    """Batches from one rank's readers; each DataLoader worker is one reader (see stream_positions).

    Every batch carries `position` = (reader, unit, raw records read into it) and the reader's
    ShardHealth state, so the stream can record exactly where each reader stands in what the trainer
    consumed. DataLoader hands out batches round-robin from worker 0, so on resume worker i plays reader
    (i + first_reader) % workers: the reader whose turn was next when the checkpoint was taken goes first.
    """

    def __init__(self, shards: list[str], rank: int, world_size: int, transform: RegionTransform,
                 collator: RegionCollator, local_batch: int, seed: int, positions: dict[int, tuple[int, int]],
                 first_reader: int, start_epoch: int, leftovers: list[Piece], max_bad_fraction: float,
                 shard_health: dict[int, list]):
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.transform, self.collator = transform, collator
        self.local_batch, self.seed, self.positions = local_batch, seed, positions
        self.first_reader, self.start_epoch, self.leftovers = first_reader, start_epoch, leftovers
        self.max_bad_fraction, self.shard_health = max_bad_fraction, shard_health

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        worker = (worker + self.first_reader) % workers
        unit, read = self.positions.get(worker, (0, 0))
        shard_health = ShardHealth(self.max_bad_fraction, self.shards, self.shard_health.get(worker))
        pending: Counter = Counter()
        samples: list[TransformedSample] = []  # an incomplete last batch rolls over into the next unit
        while True:
            piece, epoch = unit_of(self.leftovers, worker, workers, self.start_epoch, unit)
            if piece is None:
                shards = reader_shards(self.shards, self.seed, self.world_size, workers, self.rank, worker, epoch)
            else:
                shards = reader_shards(self.shards, self.seed, *piece[:5])
            skip = read + (piece.skip if piece else 0)
            whole_epoch, usable, epoch_drops = skip == 0 and piece is None, 0, Counter()
            records = read_raw_records(shards, pending)
            if skip:  # these records went into batches the trainer consumed, defects counted then
                counted = Counter(pending)
                next(itertools.islice(records, skip - 1, None), None)
                pending.clear()
                pending.update(counted)
            for record in records:
                read += 1
                sample, drops = decode_record(record, self.transform)
                pending.update(drops)
                epoch_drops.update(drops)
                pending.update(shard_health.record(record.get("__url__", "?"), usable=sample is not None))
                if sample is None:
                    continue
                read_epoch = piece.epoch if piece else epoch
                read_name = f"{self.seed}:{read_epoch}:{record.get('__url__', '')}:{record.get('__key__', read)}"
                sample = pick_boxes(sample, self.collator.max_boxes, read_name)
                usable += 1
                samples.append(sample)
                if len(samples) == self.local_batch:
                    samples[0].drops.update(pending)
                    pending.clear()
                    batch = self.collator(samples)
                    batch["position"] = (worker, unit, read)
                    batch["shard_health"] = shard_health.state()
                    yield batch
                    samples = []
            pending.update(shard_health.finish())
            if whole_epoch and read == 0:
                raise DataError(f"no readable records in shards {shards}")
            if whole_epoch and usable == 0:  # reading on would spin forever without yielding a batch
                raise DataError(f"none of the {read} records in shards {shards} is usable ({dict(epoch_drops)}); "
                                "expected the training format: image (jpg/png/webp), txt, json {boxes, region_captions}")
            if whole_epoch and usable < self.local_batch:  # a batch would hold the same record twice
                raise DataError(f"shards {shards} hold {usable} usable records, fewer than one local batch of "
                                f"{self.local_batch}; use fewer ranks or DataLoader workers, a smaller batch or "
                                "more data")
            unit, read = unit + 1, 0


class WebDatasetStream:
    """Training-format webdataset shards (image, txt, json {boxes, region_captions}), split by rank then worker.

    Corrupt images, bad annotations, missing fields, records holding a member twice or repeating a key of
    their shard, and unreadable shards are skipped and counted in each batch's data_stats; resuming restarts
    every worker at its recorded raw-record position, and a resume with another world size or worker count
    re-splits the records no reader had delivered (stream_positions).
    """

    def __init__(self, urls: str | list[str], transform: RegionTransform, collator: RegionCollator, local_batch: int,
                 rank: int, world_size: int, num_workers: int = 1, seed: int = 0, max_bad_fraction: float = 0.1):
        shards = expand_shard_urls(urls)
        missing = missing_local_shards(shards)
        if len(missing) == len(shards):
            # a typo in the pattern: otherwise every reader skips every shard and fails in the first step
            raise ConfigError(f"data.train_shards: got {urls!r}, expected existing shard files; none of its "
                              f"{len(shards)} files exists (the first: {Path(shards[0]).absolute()}){_pattern_hint(shards)}")
        if missing and rank == 0:
            log.warning("data.train_shards=%r: %d of its %d files do not exist (the first: %s); training reads the "
                        "others", urls, len(missing), len(shards), Path(missing[0]).absolute())
        # left out of the split: a reader given only missing files in some epoch would stop the run there
        absent = set(missing)
        shards = [shard for shard in shards if shard not in absent]
        readers = world_size * readers_per_rank(num_workers)
        if len(shards) < readers:
            raise ConfigError(f"data.train_shards={urls!r}: {len(shards)} shards for {world_size} ranks x "
                              f"{readers_per_rank(num_workers)} workers; expected at least {readers} (one per reader)")
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.transform, self.collator, self.local_batch = transform, collator, local_batch
        self.num_workers, self.seed, self.max_bad_fraction = num_workers, seed, max_bad_fraction
        self.positions: dict[int, tuple[int, int]] = {}
        self.shard_health: dict[int, list] = {}  # reader -> ShardHealth.state() as of its last consumed batch
        self.batches = 0
        self.start_epoch = 0
        self.leftovers: list[Piece] = []

    def state_dict(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "batches": self.batches, "positions": dict(self.positions),
                "world_size": self.world_size, "rank": self.rank, "start_epoch": self.start_epoch,
                "leftovers": [list(piece) for piece in self.leftovers],
                "shards": shard_list_fingerprint(self.shards), "seed": self.seed,
                "shard_health": dict(self.shard_health)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This rank's saved state; after a change of world size it must carry every old rank's state
        under "ranks" (checkpoint.load adds them), as the unread records of all of them are re-split."""
        state = normalized(state)
        self._check_same_records(state)
        split = (self.world_size, readers_per_rank(self.num_workers))
        if (state["world_size"], readers_per_rank(state["num_workers"])) == split:
            self.positions, self.batches = state["positions"], int(state["batches"])
            self.start_epoch, self.leftovers = state["start_epoch"], state["leftovers"]
            self.shard_health = state["shard_health"]
            return
        if "ranks" in state:
            old_ranks = [normalized(rank_state) for rank_state in state["ranks"]]
            check_ranks(old_ranks)
            old = dict(enumerate(old_ranks))
        elif state["world_size"] == self.world_size and state.get("rank", self.rank) == self.rank:
            old = {self.rank: state}  # only the worker count changed: this rank's own readers re-split
        else:
            raise ValueError(f"the checkpoint's webdataset positions were recorded by {state['world_size']} ranks and "
                             f"this run has {self.world_size}, but only rank {state.get('rank', '?')}'s position was "
                             "given: re-splitting the unread records needs every old rank's (under 'ranks', as "
                             "checkpoint.load gives them)")
        self.start_epoch, self.leftovers = resplit(old, self.rank, self.world_size)
        self.positions, self.batches = {}, 0
        # readers no longer map onto old ones: each new one knows every shard any old one had reported (a shard
        # first judged bad in the leftovers may still be reported by more than one reader, as pieces of its
        # epochs go to several; the shard each old reader was part-way through is judged on the rest only)
        reported = sorted({shard for rank_state in old.values() for health in rank_state["shard_health"].values()
                           for shard in health[3]})
        self.shard_health = {reader: [None, 0, 0, reported] for reader in range(split[1])}
        log.info("webdataset positions of %d ranks x %d readers re-split for %d x %d: this rank first reads %d "
                 "unread pieces of epochs before %d", state["world_size"], readers_per_rank(state["num_workers"]),
                 *split, len(self.leftovers), self.start_epoch, extra=PER_RANK)

    def _check_same_records(self, state: dict[str, Any]) -> None:
        """Positions count records in seeded orders of a shard list: another list or seed would silently
        skip and repeat records (checkpoints from before these were saved are not checked)."""
        shards = shard_list_fingerprint(self.shards)
        if state.get("shards", shards) != shards:
            raise ConfigError(f"data.train_shards: the checkpoint's data positions are in {state['shards']}, this "
                              f"run lists {shards}; resume with the same shards in the same order (they may move to "
                              "another folder), or start a new run")
        if state.get("seed", self.seed) != self.seed:
            raise ConfigError(f"train.seed={self.seed}: the checkpoint's data positions are in shard orders drawn "
                              f"with seed {state['seed']}; resume with that seed")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dataset = _ShardBatches(self.shards, self.rank, self.world_size, self.transform, self.collator,
                                self.local_batch, self.seed, dict(self.positions),
                                first_reader=self.batches % readers_per_rank(self.num_workers),
                                start_epoch=self.start_epoch, leftovers=self.leftovers,
                                max_bad_fraction=self.max_bad_fraction, shard_health=dict(self.shard_health))
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            worker_init_fn=leave_stop_signals_to_the_trainer)
        for batch in loader:
            reader, unit, read = batch.pop("position")
            self.positions[int(reader)] = (int(unit), int(read))
            self.shard_health[int(reader)] = batch.pop("shard_health")
            self.batches += 1
            yield batch
