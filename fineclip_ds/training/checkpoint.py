"""Checkpoints: DeepSpeed's model/optimizer/scheduler state plus, per rank, the data position and RNG.

Layout: <output_dir>/checkpoints/<tag>/ with DeepSpeed's files and trainer_state_rank<r>.pt, and
`latest` beside the tags. The client state carries DeepSpeed's `universal_checkpoint_info` so that
`ds_to_universal` can convert a checkpoint for a resume at another world size. Saving is atomic: everything is written under `<tag>.tmp`, renamed to
`<tag>` once every rank has finished, and only then is `latest` replaced (write + os.replace). A
job killed mid-save leaves a `.tmp` folder that resume never reads and the next save clears.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM_GROUPS, UNIVERSAL_CHECKPOINT_INFO

from fineclip_ds.config import ConfigError, RunConfig, changed_run_settings
from fineclip_ds.files import UNREADABLE_TORCH_FILE, free_space, write_atomically
from fineclip_ds.run_layout import LATEST

TAG_PREFIX = "step_"
TAG_PATTERN = re.compile(rf"{TAG_PREFIX}\d{{8}}")
PARTIAL_SUFFIX = ".tmp"
REPLACED_SUFFIX = ".replaced"  # a tag's previous copy while a save of the same step replaces it
UNIVERSAL_SUFFIX = "_universal"  # a tag converted for a resume at another world size
SUPERSEDED_SUFFIX = ".superseded"  # a tag after the one a run resumed from, set aside at its first save
log = logging.getLogger("fineclip_ds")


def tag_for_step(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class ResumePoint:
    directory: Path  # the folder holding the tags and `latest`
    tag: str


def find_resume_point(resume: str | None, checkpoint_dir: Path) -> ResumePoint | None:
    """`auto`: the latest checkpoint under this run's checkpoint folder, or none (fresh start).
    A path: a checkpoint folder (with `latest`) or one tag folder inside it.

    An output folder that already holds checkpoints is this run's own: a fresh start (no resume) or a
    resume from another run's checkpoint would mix a second history into it (metrics.jsonl and
    summary.json replaced, tags of both runs pruned together, `latest` left naming a pruned tag)."""
    point = _resume_point(resume, checkpoint_dir)
    own = point is not None and point.directory.resolve() == checkpoint_dir.resolve()
    if (held := _latest_tag(checkpoint_dir)) is not None and not own:
        output_dir = checkpoint_dir.parent
        raise ConfigError(f"train.output_dir {output_dir} already holds a run (its latest checkpoint is "
                          f"{held}): continue it with --resume auto "
                          f"(train.resume=auto), or start {'from ' + resume + ' ' if resume else ''}in a new "
                          "train.output_dir")
    if point is not None:
        read_from_latest = resume == "auto" or Path(resume) == point.directory  # else a tag folder was given
        _check_complete(point, named_by=point.directory / LATEST if read_from_latest else None)
    later = _later_tags(checkpoint_dir, point.tag) if own else []
    if later and (not dist.is_initialized() or dist.get_rank() == 0):
        log.warning("resuming from %s while %s of later steps exist(s) in %s: this run's first checkpoint sets "
                    "them aside as <tag>%s (kept, never pruned)", point.tag, ", ".join(later), checkpoint_dir,
                    SUPERSEDED_SUFFIX)
    return point


def _latest_tag(directory: Path, absent: str | None = None) -> str | None:
    """The tag `latest` in `directory` names, as written; `absent` where there is no `latest`."""
    latest = directory / LATEST
    return latest.read_text().strip() if latest.is_file() else absent


def _resume_point(resume: str | None, checkpoint_dir: Path) -> ResumePoint | None:
    if resume is None:
        return None
    directory = checkpoint_dir if resume == "auto" else Path(resume)
    if (tag := _latest_tag(directory)) is not None:
        return ResumePoint(directory, tag)
    if resume != "auto" and directory.is_dir() and directory.name.startswith(TAG_PREFIX):
        return ResumePoint(directory.parent, directory.name)
    if resume == "auto":
        return None
    raise ConfigError(f"train.resume (--resume): got {resume!r}, expected 'auto', a checkpoints folder with a "
                      f"'latest' file, or a tag folder ({TAG_PREFIX}N) inside one")


def _check_complete(point: ResumePoint, named_by: Path | None) -> None:
    """Before any model is built: the tag a resume would load is there with every rank's files. A `latest` that
    names no checkpoint (emptied, garbled, its tag deleted) or a tag missing a file failed only after the model
    was built, with a traceback that often named no file, and a missing trainer_state_rank1.pt passed as a
    checkpoint of fewer ranks (rank 1 then took rank 0's data position)."""
    tag_dir = point.directory / point.tag
    which = f"{named_by} names {point.tag!r}, which" if named_by else f"{tag_dir}"
    problem = None
    if not point.tag or not tag_dir.is_dir():
        problem = "is not a checkpoint folder there"
    elif not _model_state_files(tag_dir):
        problem = "has no mp_rank_00_model_states.pt (DeepSpeed's model file)"
    else:
        state = _saved_trainer_state(tag_dir)
        if state is None:
            problem = f"has no {_trainer_state_file(tag_dir, 0).name}"
        else:
            missing = [_trainer_state_file(tag_dir, rank).name for rank in range(int(state.get("world_size", 1)))
                       if not _trainer_state_file(tag_dir, rank).is_file()]
            if missing:
                problem = f"lacks {', '.join(missing)} of the {state['world_size']} ranks that saved it"
    if problem is None:
        return
    complete = [name for name in _tag_names(point.directory) if name != point.tag]
    other = (f"; its other checkpoints: {', '.join(complete[-3:])} (resume from one with --resume "
             f"{point.directory / complete[-1]})") if complete else ""
    raise ConfigError(f"train.resume: {which} {problem}: not a complete checkpoint{other}")


def _model_state_files(tag_dir: Path) -> list[Path]:
    """DeepSpeed's model file of a tag (ZeRO-3 names it zero_pp_rank_0_mp_rank_00_model_states.pt)."""
    return sorted(tag_dir.glob("*mp_rank_00_model_states.pt"))


def _tag_names(checkpoint_dir: Path) -> list[str]:
    return sorted(path.name for path in checkpoint_dir.iterdir() if path.is_dir() and TAG_PATTERN.fullmatch(path.name))


def _later_tags(checkpoint_dir: Path, tag: str) -> list[str]:
    """Tags of steps after `tag`: a resume from an older checkpoint of the run leaves them from the
    continuation it replaces."""
    return [name for name in _tag_names(checkpoint_dir) if name > tag]


def _set_aside_later_tags(checkpoint_dir: Path, saved_tag: str) -> None:
    """Rename the tags after the one just saved (a superseded continuation, see _later_tags) so that
    pruning, which keeps the newest tags, neither counts nor deletes them; their universal copies go with them."""
    for tag in _later_tags(checkpoint_dir, saved_tag):
        for name in (tag, tag + UNIVERSAL_SUFFIX):
            if (checkpoint_dir / name).is_dir():
                aside = checkpoint_dir / (name + SUPERSEDED_SUFFIX)
                copies = 1
                while aside.exists():  # set aside before, by an earlier resume from a still older tag
                    copies += 1
                    aside = checkpoint_dir / f"{name}{SUPERSEDED_SUFFIX}{copies}"
                os.replace(checkpoint_dir / name, aside)


def check_same_model(point: ResumePoint, model: nn.Module) -> None:
    """A checkpoint of another model (model.name or model.image_size changed since) fails deep inside
    DeepSpeed's load: a torch size mismatch per tensor, or under ZeRO-3 a flat-buffer copy naming none.
    DeepSpeed saves every parameter's shape; compare them before anything is converted or loaded."""
    states = _model_state_files(point.directory / point.tag)
    if not states:
        return
    try:
        state = torch.load(states[0], map_location="cpu", weights_only=False, mmap=True)
    except UNREADABLE_TORCH_FILE as error:
        raise ConfigError(f"train.resume: {states[0]} cannot be read ({error}): not a complete checkpoint") from error
    saved = {name: tuple(shape) for group in state.get("param_shapes") or [] for name, shape in group.items()}
    if not saved:
        return  # saved without ZeRO: DeepSpeed records no shapes
    # frozen parameters' shapes are recorded from ZeRO-2 on only
    saved.update({name: tuple(shape) for name, shape in (state.get("frozen_param_shapes") or {}).items()})
    current = {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}
    recorded = saved.keys() | {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    differing = sorted(name for name in recorded if saved.get(name) != current.get(name))
    if differing:
        name = differing[0]
        raise ConfigError(f"train.resume: {point.directory / point.tag} holds another model than this run's "
                          f"model.name / model.image_size ({len(differing)} parameters differ, e.g. {name}: "
                          f"{saved.get(name, 'absent')} there, {current.get(name, 'absent')} here); resume with the "
                          "settings it was trained with, or start a new train.output_dir")


def check_same_run_settings(point: ResumePoint, config: RunConfig, checkpoint_dir: Path) -> None:
    """A run continued in its own folder keeps the settings its checkpoint was saved with: a resubmitted job
    of another experiment merged into it without a word. A run branched from another run's checkpoint into a
    new folder may change what it trains (named in a warning), but not the optimizer settings or
    train.max_steps: the optimizer state and learning-rate schedule come back from the checkpoint, so a new
    optim.lr was ignored while config.json showed it, and a longer max_steps re-shaped the cosine schedule
    mid-run (the lr fell to its floor, then jumped back up). Checkpoints that hold no settings (saved before
    they were recorded) are not checked."""
    state = _saved_trainer_state(point.directory / point.tag) or {}  # find_resume_point checked it is there
    changed = changed_run_settings(state["config"], config) if "config" in state else []
    own = point.directory.resolve() == checkpoint_dir.resolve()
    refused = changed if own else [change for change in changed if _restored_from_the_checkpoint(change[0])]
    weights_only = f"--set model.pretrained={point.directory / point.tag}"
    if refused and own:
        raise ConfigError(f"train.resume: {point.directory / point.tag} was trained with other settings "
                          f"({_listed(refused)}). A run continued in its folder keeps the settings it was saved "
                          "with: resume without these changes (train.stop_at_step ends a job early), or train with "
                          f"them in a new train.output_dir from its weights ({weights_only})")
    if refused:
        raise ConfigError(f"train.resume: {point.directory / point.tag} was trained with other optimizer settings "
                          f"({_listed(refused)}), and a run resumed from it takes its optimizer state and "
                          "learning-rate schedule, which would ignore them or re-shape the schedule: keep them, or "
                          f"start from its weights alone ({weights_only})")
    if changed and (not dist.is_initialized() or dist.get_rank() == 0):
        log.warning("branching from %s with other settings (%s): the optimizer state, schedule position and data "
                    "position carry on", point.directory / point.tag, _listed(changed))


def job_of_latest(checkpoint_dir: Path) -> str | None:
    """The Slurm job id recorded by the save `latest` names (None: no checkpoint, or saved outside Slurm)."""
    tag = _latest_tag(checkpoint_dir)
    state = _saved_trainer_state(checkpoint_dir / tag) if tag is not None else None
    return state.get("slurm_job_id") if state else None


def _trainer_state_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"trainer_state_rank{rank}.pt"


def _saved_trainer_state(tag_dir: Path) -> dict[str, Any] | None:
    """Rank 0's trainer state of a tag (the same settings and job id on every rank), None when absent."""
    state_file = _trainer_state_file(tag_dir, 0)
    if not state_file.is_file():
        return None
    try:
        return torch.load(state_file, map_location="cpu", weights_only=False)
    except UNREADABLE_TORCH_FILE as error:
        raise ConfigError(f"train.resume: {state_file} cannot be read ({error}): not a complete checkpoint") from error


def _restored_from_the_checkpoint(field_path: str) -> bool:
    return field_path.startswith("optim.") or field_path == "train.max_steps"


def _listed(changes: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{field}: {json.dumps(before)} there, {json.dumps(now)} now" for field, before, now in changes)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# How torch.save's writer words a failed write (a full disk, a quota): its RuntimeErrors that are about the file.
TORCH_SAVE_FAILURES = ("inline_container", "PytorchStreamWriter", "file write failed", "No space left", "quota")


class CheckpointSaveError(RuntimeError):
    """A save that could not be written (a full or read-only disk): the run stops with the last complete one."""


def save(engine, checkpoint_dir: Path, step: int, trainer_state: dict[str, Any], keep_last: int,
         set_aside_after: str | None = None) -> Path:
    """Collective: every rank calls it. Returns the tag folder. `set_aside_after`: the tag this start resumed from,
    at its first save: every later tag (the continuation it replaces) is set aside before this one is put in place,
    the tag of this very step included, which would otherwise be taken for a re-save of the step and deleted.

    A rank whose write fails removes the half-written folder (so that a resubmitted job finds its space) and
    raises CheckpointSaveError: torch.save on a full disk says only 'unexpected pos 128 vs 0'."""
    tag = tag_for_step(step)
    partial_tag = tag + PARTIAL_SUFFIX
    partial_dir = checkpoint_dir / partial_tag
    if not checkpoint_dir.is_dir():  # made at start: the run folder was moved or deleted since
        raise CheckpointSaveError(f"saving step {step}: {checkpoint_dir} is gone, the run folder was moved or "
                                  "deleted while training; a save there would start a second, partial run folder. "
                                  "Move it back and resume with --resume auto")
    if engine.global_rank == 0:
        shutil.rmtree(partial_dir, ignore_errors=True)  # left by a job killed while saving
    _barrier()
    try:
        partial_dir.mkdir(exist_ok=True)
        torch.save({**trainer_state, "rng": rng_state()}, _trainer_state_file(partial_dir, engine.global_rank))
        engine.save_checkpoint(str(checkpoint_dir), tag=partial_tag, save_latest=False,
                               client_state={"step": step, UNIVERSAL_CHECKPOINT_INFO: {}})
    except (OSError, RuntimeError) as error:
        shutil.rmtree(partial_dir, ignore_errors=True)
        if not isinstance(error, OSError) and not any(sign in str(error) for sign in TORCH_SAVE_FAILURES):
            raise  # not the disk: a collective inside DeepSpeed's save failed (a peer died), said as it is
        last = _latest_tag(checkpoint_dir, absent="none")
        raise CheckpointSaveError(
            f"saving step {step} into {partial_dir} failed ({error}; {free_space(checkpoint_dir)}); the last complete "
            f"checkpoint is {last}. A save needs room for one more checkpoint beside the train.keep_last kept: free "
            "space and resume with --resume auto") from error
    _barrier()
    return _complete(engine, checkpoint_dir, tag, keep_last, set_aside_after)


def _complete(engine, checkpoint_dir: Path, tag: str, keep_last: int, set_aside_after: str | None = None) -> Path:
    """Collective: rank 0 renames the written tag into place, points `latest` at it and prunes."""
    partial_dir, final_dir = checkpoint_dir / (tag + PARTIAL_SUFFIX), checkpoint_dir / tag
    if engine.global_rank == 0:
        if set_aside_after is not None:
            _set_aside_later_tags(checkpoint_dir, set_aside_after)
        # Re-saving a step (the non-finite stop does, with the data position moved on): the old copy
        # is renamed aside, not deleted first, so `latest` names a missing folder for one rename only.
        replaced_dir = checkpoint_dir / (tag + REPLACED_SUFFIX)
        shutil.rmtree(replaced_dir, ignore_errors=True)
        if final_dir.is_dir():
            os.replace(final_dir, replaced_dir)
        os.replace(partial_dir, final_dir)
        shutil.rmtree(replaced_dir, ignore_errors=True)
        _point_latest_at(checkpoint_dir, tag)
        _set_aside_later_tags(checkpoint_dir, tag)
        _prune(checkpoint_dir, keep_last)
    _barrier()
    return final_dir


def _point_latest_at(checkpoint_dir: Path, tag: str) -> None:
    """Replace `latest`; on a full disk even these few bytes fail, after the tag itself was written whole."""
    latest = checkpoint_dir / LATEST
    try:
        write_atomically(latest, tag)
    except OSError as error:
        last = _latest_tag(checkpoint_dir, absent="none")
        raise CheckpointSaveError(
            f"{checkpoint_dir / tag} was saved whole, but pointing {latest} at it failed ({error}; "
            f"{free_space(checkpoint_dir)}); it still names {last}. Free space and resume from the new one with "
            f"--resume {checkpoint_dir / tag}") from error


def _prune(checkpoint_dir: Path, keep_last: int) -> None:
    """After a complete save: all but the last `keep_last` tags, universal copies of tags no longer here (pruned,
    or another run's a branch started from), and every save a killed job left half written (a preemption or
    non-finite stop saves off the save_every schedule, so no later save of that step clears it)."""
    for old in _tag_names(checkpoint_dir)[:-keep_last]:
        shutil.rmtree(checkpoint_dir / old, ignore_errors=True)
    kept = set(_tag_names(checkpoint_dir))
    for universal in checkpoint_dir.glob(f"{TAG_PREFIX}*{UNIVERSAL_SUFFIX}"):  # of pruned tags, or another run's
        if universal.name.removesuffix(UNIVERSAL_SUFFIX) not in kept:
            shutil.rmtree(universal, ignore_errors=True)
    for half_written in checkpoint_dir.glob(f"{TAG_PREFIX}*{PARTIAL_SUFFIX}"):
        shutil.rmtree(half_written, ignore_errors=True)


def saved_world_size(point: ResumePoint) -> int:
    """How many ranks wrote the checkpoint (one trainer-state file each)."""
    return len(list((point.directory / point.tag).glob("trainer_state_rank*.pt")))


def convert_to_universal(point: ResumePoint, rank: int, into: Path | None = None) -> ResumePoint:
    """Collective. DeepSpeed's universal format (parameters and Adam states per parameter, not per
    rank) is what a different world size can load; rank 0 converts once, into `into`: this run's
    checkpoint folder (default: beside the original tag). A run branched from another run's checkpoint
    so writes nothing into that run's folder, which may be read-only or someone else's; the copy is
    pruned at the branch's first save. ds_to_universal also writes `latest_universal`, naming its output
    folder (our `.tmp` one, renamed next): resume loads by tag and never reads it, and `latest` stays the
    one pointer, so it is removed."""
    into = into or point.directory
    universal = into / (point.tag + UNIVERSAL_SUFFIX)
    if rank == 0 and not universal.is_dir():
        partial = into / (point.tag + UNIVERSAL_SUFFIX + PARTIAL_SUFFIX)
        shutil.rmtree(partial, ignore_errors=True)
        converted = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                                    str(point.directory / point.tag), "--output_folder", str(partial)],
                                   capture_output=True, text=True)
        if converted.returncode != 0:
            raise RuntimeError(f"converting {point.directory / point.tag} to DeepSpeed's universal checkpoint "
                               f"failed (exit {converted.returncode}):\n{converted.stderr[-3000:]}")
        for trainer_state in (point.directory / point.tag).glob("trainer_state_rank*.pt"):
            shutil.copy2(trainer_state, partial / trainer_state.name)
        os.replace(partial, universal)
        (into / (LATEST + UNIVERSAL_SUFFIX)).unlink(missing_ok=True)
    _barrier()
    return ResumePoint(into, universal.name)


def _repair_zero3_universal_load(engine, point: ResumePoint) -> None:
    """Undo two faults of DeepSpeed's ZeRO-3 universal load (stage3.py,
    load_hp_checkpoint_state_from_checkpoint_dir_stage3); weights and Adam moments do load exactly.

    1. It puts one and the same `step` tensor into the state of every optimizer sub-group. AdamW
       increments `step` in place, so each optimizer step then advanced it once per sub-group
       (2 here: decay and no-decay) and Adam's bias correction used the wrong step from the first
       step after the load on: the resumed run drifted (the test job's loss 2 steps on by 2.3e-4,
       4e-5 relative) and the wrong count was saved into the next checkpoints.
    2. It gives every param group the hyperparameters of saved group 0: the no-decay group (norms,
       biases, logit_scale) came back with weight decay. The converted checkpoint keeps every
       group's hyperparameters; they are put back group by group."""
    optimizer = engine.optimizer.optimizer
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    saved = torch.load(point.directory / point.tag / "zero" / "optimizer_state.pt", map_location="cpu",
                       weights_only=False, mmap=True)
    saved_groups = saved[OPTIMIZER_STATE_DICT][PARAM_GROUPS]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"{point.directory / point.tag} has {len(saved_groups)} optimizer param groups, "
                         f"this run's optimizer has {len(optimizer.param_groups)}")
    for group, saved_group in zip(optimizer.param_groups, saved_groups):
        group.update({key: value for key, value in saved_group.items() if key != "params"})


def load(engine, point: ResumePoint) -> dict[str, Any]:
    """Collective. Restores engine state and RNG; returns this rank's trainer state (step, data position).

    After a change of world size, rank r reads the trainer state of saved rank r mod (saved ranks):
    the step and the synthetic data position are the same on every rank. Streams split per rank
    (webdataset) re-split what no old rank had read, so their state then also carries every saved
    rank's stream state, in rank order, under "ranks"."""
    saved_ranks = saved_world_size(point)
    if saved_ranks == 0:
        raise FileNotFoundError(f"{point.directory / point.tag} has no trainer_state_rank*.pt: not a complete checkpoint")
    state_file = _trainer_state_file(point.directory / point.tag, engine.global_rank % saved_ranks)
    loaded, _ = engine.load_checkpoint(str(point.directory), tag=point.tag)
    if loaded is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint at {point.directory}/{point.tag}")
    if engine.load_universal_checkpoint() and engine.zero_optimization_stage() == 3:
        _repair_zero3_universal_load(engine, point)
    state = torch.load(state_file, weights_only=False)
    set_rng_state(state.pop("rng"))
    if saved_ranks != (dist.get_world_size() if dist.is_initialized() else 1):
        state["stream"]["ranks"] = [torch.load(_trainer_state_file(point.directory / point.tag, rank),
                                               weights_only=False)["stream"] for rank in range(saved_ranks)]
    return state
