"""One output folder holds one run's history: a second run is refused, an older resume point keeps what came after."""
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from fineclip_ds.config import ConfigError, RunConfig, load_config
from fineclip_ds.training.checkpoint import (CheckpointSaveError, ResumePoint, _prune, _set_aside_later_tags,
                                             check_same_model, check_same_run_settings, find_resume_point, save,
                                             tag_for_step)
from fineclip_ds.training import engine
from fineclip_ds.training.engine import Clocks, Run, resume_of_a_requeued_job
from fineclip_ds.training.nonfinite import NonFiniteGuard
from tests.training.launcher import COMMON, REPO, run_pretrain


def _checkpoints(root: Path, steps: list[int], latest: int, ranks: int = 1) -> Path:
    """Tag folders with the files a complete checkpoint of `ranks` ranks has (their contents stand-ins)."""
    checkpoints = root / "checkpoints"
    for step in steps:
        (checkpoints / tag_for_step(step)).mkdir(parents=True)
        (checkpoints / tag_for_step(step) / "mp_rank_00_model_states.pt").write_bytes(b"")
        for rank in range(ranks):
            torch.save({"world_size": ranks}, checkpoints / tag_for_step(step) / f"trainer_state_rank{rank}.pt")
    (checkpoints / "latest").write_text(tag_for_step(latest))
    return checkpoints


@pytest.mark.parametrize("damage", ["latest_empty", "latest_garbled", "latest_tag_deleted", "model_file_deleted",
                                    "rank_1_state_deleted", "rank_0_state_truncated"])
def test_a_damaged_resume_point_is_named_before_any_model_is_built(tmp_path, damage):
    """These failed after the model was built, with tracebacks that often named no file; a missing rank-1 state
    passed as a checkpoint of one rank, whose data position rank 1 then took."""
    checkpoints = _checkpoints(tmp_path / "run", [2, 4, 6], latest=6, ranks=2)
    tag = checkpoints / tag_for_step(6)
    if damage == "latest_empty":
        (checkpoints / "latest").write_text("")
    elif damage == "latest_garbled":
        (checkpoints / "latest").write_text(tag_for_step(6) + "\x00junk")
    elif damage == "latest_tag_deleted":
        shutil.rmtree(tag)
    elif damage == "model_file_deleted":
        (tag / "mp_rank_00_model_states.pt").unlink()
    elif damage == "rank_1_state_deleted":
        (tag / "trainer_state_rank1.pt").unlink()
    else:
        (tag / "trainer_state_rank0.pt").write_bytes((tag / "trainer_state_rank0.pt").read_bytes()[:20])
    expected = {"latest_empty": r"latest names '', which is not a checkpoint folder there",
                "latest_garbled": r"latest names 'step_00000006\\x00junk', which is not a checkpoint folder there",
                "latest_tag_deleted": r"latest names 'step_00000006', which is not a checkpoint folder there",
                "model_file_deleted": r"has no mp_rank_00_model_states.pt",
                "rank_1_state_deleted": r"lacks trainer_state_rank1.pt of the 2 ranks that saved it",
                "rank_0_state_truncated": r"trainer_state_rank0.pt cannot be read"}[damage]
    with pytest.raises(ConfigError, match=expected):
        find_resume_point("auto", checkpoints)
    others = "step_00000002, step_00000004, step_00000006" if damage in ("latest_empty", "latest_garbled") else \
        "step_00000002, step_00000004"
    if damage != "rank_0_state_truncated":
        with pytest.raises(ConfigError, match=rf"not a complete checkpoint; its other checkpoints: {others} \(resume "
                                              rf"from one with --resume .*{others[-13:]}\)"):
            find_resume_point("auto", checkpoints)
    assert find_resume_point(str(checkpoints / tag_for_step(4)), checkpoints) == ResumePoint(checkpoints,
                                                                                             tag_for_step(4))


def test_a_fresh_start_or_another_runs_checkpoint_in_a_folder_holding_a_run_is_refused(tmp_path):
    """Before, it replaced metrics.jsonl and summary.json and pruned both runs' tags together."""
    checkpoints = _checkpoints(tmp_path / "run", [10, 20], latest=20)
    other = _checkpoints(tmp_path / "other", [5], latest=5)
    for resume in (None, str(other), str(other / tag_for_step(5))):
        with pytest.raises(ConfigError, match=r"train.output_dir .*run already holds a run \(its latest checkpoint is "
                                              r"step_00000020\): continue it with --resume auto"):
            find_resume_point(resume, checkpoints)
    assert find_resume_point("auto", checkpoints) == ResumePoint(checkpoints, tag_for_step(20))
    assert find_resume_point(None, other.parent / "new" / "checkpoints") is None


def test_a_resume_from_an_older_tag_of_the_run_names_the_later_ones_it_keeps(tmp_path, caplog):
    checkpoints = _checkpoints(tmp_path / "run", [10, 20, 30], latest=30)
    with caplog.at_level(logging.WARNING, logger="fineclip_ds"):
        point = find_resume_point(str(checkpoints / tag_for_step(10)), checkpoints)
        find_resume_point(str(checkpoints / tag_for_step(10)), tmp_path / "fine-tune" / "checkpoints")
    assert point == ResumePoint(checkpoints, tag_for_step(10))
    # said once: a resume from another run's folder into a new one leaves that folder alone
    assert caplog.text.count("step_00000020, step_00000030 of later steps exist(s)") == 1


def test_a_save_clears_what_killed_saves_of_other_steps_left_half_written(tmp_path):
    """A job killed while saving off the save_every schedule (a preemption at step 137) left step_137.tmp,
    which no later save of step 137 would clear: it stayed for good, a whole checkpoint's size."""
    checkpoints = tmp_path / "checkpoints"
    for name in ("step_00000100", "step_00000137.tmp", "step_00000100_universal.tmp", "step_00000200"):
        (checkpoints / name).mkdir(parents=True)
        (checkpoints / name / "mp_rank_00_model_states.pt").write_bytes(b"0")
    _prune(checkpoints, keep_last=3)
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step_00000100", "step_00000200"]


def test_a_truncated_model_file_is_named_before_the_model_is_loaded(tmp_path):
    """The shape check read it first and failed with 'PytorchStreamReader failed ...', naming no file."""
    checkpoints = _checkpoints(tmp_path / "run", [2], latest=2)
    model_file = checkpoints / tag_for_step(2) / "mp_rank_00_model_states.pt"
    torch.save({"param_shapes": [{"weight": (2, 2)}]}, model_file)
    model_file.write_bytes(model_file.read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"train.resume: .*mp_rank_00_model_states.pt cannot be read"):
        check_same_model(ResumePoint(checkpoints, tag_for_step(2)), torch.nn.Linear(2, 2))


class _EngineOnAFullDisk:
    global_rank = 0

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool, client_state: dict) -> None:
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"written in part")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 0")


def test_a_save_that_cannot_be_written_says_so_and_removes_what_it_wrote(tmp_path):
    """A full disk gave tracebacks from every rank that never said so, and the half-written folder it left kept the
    disk full for the resubmitted job."""
    checkpoints = _checkpoints(tmp_path / "run", [2], latest=2)
    with pytest.raises(CheckpointSaveError, match=r"saving step 4 into .*step_00000004.tmp failed \(.*unexpected pos "
                                                  r"128 vs 0; \d+ MiB free there\); the last complete checkpoint is "
                                                  r"step_00000002\. A save needs room for one more checkpoint"):
        save(_EngineOnAFullDisk(), checkpoints, 4, {"step": 4}, keep_last=3)
    assert sorted(path.name for path in checkpoints.iterdir()) == ["latest", "step_00000002"]
    assert (checkpoints / "latest").read_text() == "step_00000002"
    (tmp_path / "run").rename(tmp_path / "moved")  # while training: a save re-made run/ with only its checkpoint
    with pytest.raises(CheckpointSaveError, match=r"saving step 4: .*run/checkpoints is gone, the run folder was "
                                                  r"moved or deleted while training"):
        save(_EngineOnAFullDisk(), checkpoints, 4, {"step": 4}, keep_last=3)
    assert not (tmp_path / "run").exists()


class _EngineWhosePeerDied(_EngineOnAFullDisk):
    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool, client_state: dict) -> None:
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"written in part")
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")


def test_a_collective_failing_inside_a_save_is_not_reported_as_a_full_disk(tmp_path):
    """Every RuntimeError of DeepSpeed's save was worded as a write that failed, with the free space."""
    checkpoints = _checkpoints(tmp_path / "run", [2], latest=2)
    with pytest.raises(RuntimeError, match="Connection closed by peer") as raised:
        save(_EngineWhosePeerDied(), checkpoints, 4, {"step": 4}, keep_last=3)
    assert not isinstance(raised.value, CheckpointSaveError)
    assert sorted(path.name for path in checkpoints.iterdir()) == ["latest", "step_00000002"]


class _EngineWithRoomForOneTag(_EngineOnAFullDisk):
    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool, client_state: dict) -> None:
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"whole")


def test_a_full_disk_at_the_latest_pointer_names_the_saved_tag_to_resume_from(tmp_path, monkeypatch):
    """The tag was written whole, then the few bytes of `latest` failed: a raw OSError traceback from rank 0."""
    checkpoints = _checkpoints(tmp_path / "run", [2], latest=2)
    real_write = Path.write_text

    def full_disk(path: Path, text: str, *args, **kwargs):
        if path.name.startswith("latest"):
            raise OSError(28, "No space left on device")
        return real_write(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(CheckpointSaveError, match=r"checkpoints/step_00000004 was saved whole, but pointing "
                                                  r".*checkpoints/latest at it failed \(.*No space left on device; "
                                                  r"\d+ MiB free there\); it still names step_00000002\. Free space "
                                                  r"and resume from the new one with --resume .*/step_00000004$"):
        save(_EngineWithRoomForOneTag(), checkpoints, 4, {"step": 4}, keep_last=3)
    assert (checkpoints / "latest").read_text() == "step_00000002"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["latest", "step_00000002", "step_00000004"]


def test_saves_after_an_older_resume_point_set_the_later_tags_aside_and_prune_only_their_own(tmp_path):
    """Resumed from step 10 of a run that had reached 30, saving every 15 with keep_last=3: the old code deleted
    the run's own step 15 at step 45 while keeping the superseded 20 (and, with keep_last=1, deleted the tag
    `latest` had just been set to)."""
    checkpoints = _checkpoints(tmp_path / "run", [10, 20, 30], latest=30)
    (checkpoints / (tag_for_step(20) + "_universal")).mkdir()
    (checkpoints / (tag_for_step(30) + ".superseded")).mkdir()  # set aside by an earlier resume already
    for step in (15, 30, 45):
        (checkpoints / tag_for_step(step)).mkdir(exist_ok=True)
        _set_aside_later_tags(checkpoints, tag_for_step(step))
        _prune(checkpoints, keep_last=3)
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == sorted([
        tag_for_step(15), tag_for_step(20) + "_universal.superseded", tag_for_step(20) + ".superseded",
        tag_for_step(30), tag_for_step(30) + ".superseded", tag_for_step(30) + ".superseded2", tag_for_step(45)])


class _EngineWritingTags:
    global_rank = 0
    device = torch.device("cpu")

    def save_checkpoint(self, directory, tag, save_latest, client_state):
        (Path(directory) / tag / "mp_rank_00_model_states.pt").write_bytes(b"new")


class _Stream:
    def state_dict(self):
        return {"position": 0}


def test_a_resumed_runs_first_save_on_a_later_tags_step_sets_that_tag_aside_too(tmp_path):
    """Resumed from step 10 of a run that had reached 30, saving every 10: the first save, of step 20, took the old
    step 20 for a re-save of its own step and deleted it (the warning at start promised to keep it), and left the
    old 20's universal copy beside the new 20, where a resume at another world size would have loaded it."""
    checkpoints = _checkpoints(tmp_path / "run", [10, 20, 30], latest=30)
    for step in (10, 20, 30):
        (checkpoints / tag_for_step(step) / "mp_rank_00_model_states.pt").write_bytes(b"old")
    (checkpoints / (tag_for_step(20) + "_universal")).mkdir()
    config = RunConfig()
    config.train.keep_last = 3
    needed = {field.name: None for field in dataclasses.fields(Run)
              if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING}
    run = Run(**{**needed, "config": config, "rank": 0, "world_size": 1, "checkpoint_dir": checkpoints,
                 "engine": _EngineWritingTags(), "stream": _Stream(), "micro_batch": 1, "accumulation": 1,
                 "nonfinite": NonFiniteGuard(5)}, start_step=10)
    for step in (20, 30):
        engine._save(run, Clocks(), step)
        assert (checkpoints / tag_for_step(step) / "mp_rank_00_model_states.pt").read_bytes() == b"new"
        assert (checkpoints / "latest").read_text() == tag_for_step(step)
    for step in (20, 30):
        assert (checkpoints / (tag_for_step(step) + ".superseded") / "mp_rank_00_model_states.pt").read_bytes() == b"old"
    assert (checkpoints / (tag_for_step(20) + "_universal.superseded")).is_dir()
    assert not (checkpoints / (tag_for_step(20) + "_universal")).exists()


def test_the_trainer_refuses_a_second_run_into_a_run_folder_and_changes_nothing(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["one_zero2"], run)
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    result = run_pretrain(1, REPO / "ds_configs" / "zero2.json", run, "--max_steps", "2", check=False)
    assert result.returncode == 2
    assert f"config error: train.output_dir {run} already holds a run" in result.stderr
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before


def test_a_fresh_start_moves_an_earlier_starts_logs_aside_instead_of_replacing_them(runs, tmp_path):
    """With checkpoints/ moved away (to keep them), a fresh start into the folder dropped every line of
    metrics.jsonl and replaced config.json, summary.json and the TensorBoard events."""
    run = tmp_path / "run"
    shutil.copytree(runs["one_zero2"], run)
    shutil.move(run / "checkpoints", tmp_path / "kept_checkpoints")
    earlier = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "summary.json", "config.json")}
    result = run_pretrain(1, REPO / "ds_configs" / "zero2.json", run, "--max_steps", "1", "--set", "eval.every=0")
    assert "held the logs of an earlier start with no checkpoint to resume: moved to" in result.stderr
    moved = run / "earlier_start_1"
    assert {name: (moved / name).read_bytes() for name in earlier} == earlier
    assert any((moved / "tensorboard").iterdir())
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_run_folder_one_rank_cannot_write_stops_every_rank_before_the_model_is_built(tmp_path):
    """A node-local output_dir read-only on one node: that rank exited 2, the others built the model and waited
    for it in DeepSpeed's first collective until the launcher killed them, saying nothing."""
    from tests.training.launcher import GLOBAL_BATCH, write_ds_config
    result = run_pretrain(2, write_ds_config(tmp_path / "two.json", GLOBAL_BATCH // 2, 2), tmp_path / "run",
                          "--max_steps", "1", script=REPO / "tests" / "training" / "unwritable_rank_pretrain.py",
                          env={"FINECLIP_TEST_UNWRITABLE_RANK": "1"}, check=False, timeout=240)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"train.output_dir {tmp_path / 'run'}: cannot write there ([Errno 30] Read-only file system" in result.stderr
    assert f"train.output_dir {tmp_path / 'run'}: rank(s) 1 cannot write there" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_resume_that_changes_what_the_run_trains_is_refused_naming_each_field(runs, tmp_path):
    """A changed optim.lr was ignored (the optimizer and schedule come back from the checkpoint) while
    config.json showed it, and a longer max_steps re-shaped the cosine schedule mid-run. How the run runs
    (logging, saving, stopping early) may change."""
    run = tmp_path / "run"
    shutil.copytree(runs["one_zero2"], run)
    ds_config = runs["one_zero2"].parent / "one_zero2.json"
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    changed = run_pretrain(1, ds_config, run, *COMMON, "--resume", "auto", "--set", "optim.lr=5e-3",
                           "--max_steps", "8", check=False)
    assert changed.returncode == 2, changed.stderr[-3000:]
    error = " ".join(changed.stderr.split())
    assert "was trained with other settings (optim.lr: 0.0001 there, 0.005 now; train.max_steps: 4 there, 8 now)" in error
    assert f"--set model.pretrained={run / 'checkpoints' / 'step_00000004'}" in error
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before
    run_pretrain(1, ds_config, run, *COMMON, "--resume", "auto", "--set", "train.log_every=3",
                 "--set", "data.num_workers=1", "--set", "train.stop_at_step=4")


def test_a_requeued_job_continues_from_the_checkpoint_this_job_saved(tmp_path, monkeypatch):
    """launch/slurm_pretrain.sbatch sets FINECLIP_REQUEUED=1 on an allocation Slurm requeued: sbatch ... --resume
    PATH restarted from PATH, then stopped on meeting the run's own checkpoints. Before the job's first save it
    starts from PATH still, not from scratch, nor from a later tag it was rolled back from."""
    start = str(_checkpoints(tmp_path / "a", [500], latest=500))
    own = tmp_path / "b" / "checkpoints"
    monkeypatch.setenv("FINECLIP_REQUEUED", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert resume_of_a_requeued_job(start, own) == start  # died before its first save
    _checkpoints(tmp_path / "b", [10, 20], latest=20)
    rollback = str(own / tag_for_step(10))
    torch.save({"slurm_job_id": "76", "world_size": 1}, own / tag_for_step(20) / "trainer_state_rank0.pt")
    assert resume_of_a_requeued_job(rollback, own) == rollback  # step 20 is an earlier job's: the rollback stands
    torch.save({"slurm_job_id": "77", "world_size": 1}, own / tag_for_step(20) / "trainer_state_rank0.pt")
    assert resume_of_a_requeued_job(start, own) == "auto"
    assert find_resume_point(resume_of_a_requeued_job(start, own), own) == ResumePoint(own, tag_for_step(20))
    monkeypatch.delenv("FINECLIP_REQUEUED")
    assert resume_of_a_requeued_job(start, own) == start  # not requeued: refused, as any second run would be


def _saved_with(root: Path, config: RunConfig) -> ResumePoint:
    checkpoints = _checkpoints(root, [8], latest=8)
    torch.save({"config": config.to_dict()}, checkpoints / tag_for_step(8) / "trainer_state_rank0.pt")
    return ResumePoint(checkpoints, tag_for_step(8))


def test_a_run_branched_into_a_new_folder_may_change_what_it_trains_but_not_its_optimizer(tmp_path, caplog):
    """Branching from another run's tag (optimizer state, schedule and data position carry on) into a new folder
    changes the objective on purpose; in the run's own folder the same change is another experiment merged in."""
    saved = load_config("tiny-cpu", ["model.image_size=64"])
    point = _saved_with(tmp_path / "run", saved)
    branch = load_config("tiny-cpu", ["model.image_size=[64, 64]", "losses.w_sd=0", "data.train_shards=/moved/{0..3}.tar",
                                      "train.log_every=1"])
    with caplog.at_level(logging.WARNING, logger="fineclip_ds"):
        check_same_run_settings(point, branch, tmp_path / "branch" / "checkpoints")
    assert "branching from" in caplog.text and "losses.w_sd: 1.0 there, 0.0 now" in caplog.text
    assert "image_size" not in caplog.text and "train_shards" not in caplog.text and "log_every" not in caplog.text
    with pytest.raises(ConfigError, match=r"other settings \(losses.w_sd: 1.0 there, 0.0 now\)"):
        check_same_run_settings(point, branch, point.directory)
    for change in ("optim.lr=7e-4", "train.max_steps=999"):
        with pytest.raises(ConfigError, match=r"other optimizer settings \((optim.lr|train.max_steps)"):
            check_same_run_settings(point, load_config("tiny-cpu", ["model.image_size=64", change]),
                                    tmp_path / "branch" / "checkpoints")
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"")
    with pytest.raises(ConfigError, match="model.pretrained: null there"):  # frozen weights come from it at times
        check_same_run_settings(point, load_config("tiny-cpu", ["model.image_size=64", f"model.pretrained={weights}"]),
                                point.directory)
