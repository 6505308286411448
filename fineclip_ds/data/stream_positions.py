"""Where each webdataset reader stands, and how the records no reader has delivered are re-split
when a run resumes with another number of ranks or DataLoader workers.

Reader (rank, worker) of a world_size x workers split reads shards[rank::world_size][worker::workers]
once per epoch, in an order drawn from [seed, worker, epoch]. After a re-split, a reader first reads
its `leftovers` (pieces of old readers' epochs, each past the raw records they had delivered), then
its own epochs from `start_epoch` on. Its position is (unit, raw records read into that unit): units
0..len(leftovers)-1 are its pieces, unit len(leftovers)+k is epoch start_epoch+k. With no leftovers
and start_epoch 0, unit == epoch: the format of checkpoints written before re-splitting existed.

Old readers may stand in different epochs (shards differ in size). The furthest epoch T that any of
them has started is finished by all: each contributes the rest of its current epoch and its whole
epochs up to T, so every record is read exactly T + 1 times before the new split starts at T + 1.
Old rank q's pieces go to new rank q % world_size, round-robin over its workers (ranks added by
the resume have none and start epoch T + 1 at once). When only the worker count changes, each rank
re-splits its own readers (T is then the furthest of its own), so it needs no other rank's state.
"""
from __future__ import annotations

import hashlib
from pathlib import PurePosixPath
from typing import Any, NamedTuple

import numpy as np


class Piece(NamedTuple):
    """Reader (rank, worker) of a world_size x workers split, in `epoch`, past its first `skip` raw records."""
    world_size: int
    workers: int
    rank: int
    worker: int
    epoch: int
    skip: int


def reader_shards(shards: list[str], seed: int, world_size: int, workers: int, rank: int, worker: int,
                  epoch: int) -> list[str]:
    """The shards that reader (rank, worker) reads in `epoch`, in reading order."""
    own = shards[rank::world_size][worker::workers]
    return [own[i] for i in np.random.default_rng([seed, worker, epoch]).permutation(len(own))]


def shard_list_fingerprint(shards: list[str]) -> str:
    """What positions index into: the shard count and a digest of the shards' file names in order.
    File names, not paths, so that a run resumes after its data moves to another mount."""
    names = "\n".join(PurePosixPath(shard).name for shard in shards)
    return f"{len(shards)} shards, names sha256 {hashlib.sha256(names.encode()).hexdigest()[:16]}"


def readers_per_rank(num_workers: int) -> int:
    return max(1, num_workers)  # num_workers=0: the main process reads, as one reader


def unit_of(leftovers: list[Piece], worker: int, workers: int, start_epoch: int, unit: int) -> tuple[Piece | None, int]:
    """(the leftover piece, or None in an epoch of the split; the epoch it belongs to) for a reader's `unit`."""
    mine = leftovers[worker::workers]
    return (mine[unit], start_epoch - 1) if unit < len(mine) else (None, start_epoch + unit - len(mine))


def normalized(state: dict[str, Any]) -> dict[str, Any]:
    """A saved stream state with int reader keys, tuple positions and Piece leftovers (JSON and older
    checkpoints give string keys, lists, or no leftovers or shard health)."""
    return {**state, "positions": {int(worker): tuple(p) for worker, p in state["positions"].items()},
            "shard_health": {int(worker): list(health) for worker, health in state.get("shard_health", {}).items()},
            "start_epoch": int(state.get("start_epoch", 0)),
            "leftovers": [Piece(*piece) for piece in state.get("leftovers", [])]}


def _unread(state: dict[str, Any]) -> list[tuple[list[Piece], int, int, int]]:
    """Per reader of a normalized old rank state: (its unread leftover pieces, worker, the epoch of its
    split it stands in, raw records read into that epoch)."""
    workers = readers_per_rank(state["num_workers"])
    readers = []
    for worker in range(workers):
        unit, read = state["positions"].get(worker, (0, 0))
        mine = state["leftovers"][worker::workers]
        if unit < len(mine):
            rest = [mine[unit]._replace(skip=mine[unit].skip + read), *mine[unit + 1:]]
            readers.append((rest, worker, state["start_epoch"], 0))
        else:
            readers.append(([], worker, state["start_epoch"] + unit - len(mine), read))
    return readers


def resplit(states: dict[int, dict[str, Any]], rank: int, world_size: int) -> tuple[int, list[Piece]]:
    """(start_epoch, leftovers) of new rank `rank` of `world_size`, from normalized old rank states (old
    rank -> state): what their readers had not delivered, up to the end of the furthest epoch any of
    them had started. Old rank q's pieces go to new rank q % world_size."""
    unread = {old_rank: _unread(state) for old_rank, state in states.items()}
    last_epoch = max(epoch if read else epoch - 1 for readers in unread.values() for _, _, epoch, read in readers)
    pieces = []
    for old_rank in sorted(unread):
        if old_rank % world_size != rank:
            continue
        old_world_size, workers = states[old_rank]["world_size"], readers_per_rank(states[old_rank]["num_workers"])
        for rest, worker, epoch, read in unread[old_rank]:
            pieces += rest
            pieces += [Piece(old_world_size, workers, old_rank, worker, e, read if e == epoch else 0)
                       for e in range(epoch, last_epoch + 1)]
    return last_epoch + 1, pieces


def check_ranks(states: list[dict[str, Any]]) -> None:
    """Every old rank must be there once, in order, agreeing on the split: a missing one would lose its records."""
    for old_rank, state in enumerate(states):
        if state["world_size"] != len(states) or state.get("rank", old_rank) != old_rank:
            raise ValueError(f"webdataset position {old_rank} of {len(states)} in the checkpoint was recorded by rank "
                             f"{state.get('rank', old_rank)} of {state['world_size']}: every rank's position is "
                             "needed, once and in rank order, to re-split the unread records")
        workers = readers_per_rank(state["num_workers"])
        if any(not 0 <= worker < workers for worker in state["positions"]):
            raise ValueError(f"webdataset position of rank {old_rank} names readers {sorted(state['positions'])} "
                             f"but was recorded with {workers} per rank")
