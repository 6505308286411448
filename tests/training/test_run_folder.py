"""One output folder holds one run's history: a second run is refused, an older resume point keeps what came after."""
import logging
import shutil
from pathlib import Path

import pytest

from fineclip_ds.config import ConfigError
from fineclip_ds.training.checkpoint import ResumePoint, _prune, _set_aside_later_tags, find_resume_point, tag_for_step
from fineclip_ds.training.engine import resume_of_a_requeued_job
from tests.training.launcher import COMMON, REPO, run_pretrain


def _checkpoints(root: Path, steps: list[int], latest: int) -> Path:
    checkpoints = root / "checkpoints"
    for step in steps:
        (checkpoints / tag_for_step(step)).mkdir(parents=True)
    (checkpoints / "latest").write_text(tag_for_step(latest))
    return checkpoints


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


def test_the_trainer_refuses_a_second_run_into_a_run_folder_and_changes_nothing(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["one_zero2"], run)
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    result = run_pretrain(1, REPO / "ds_configs" / "zero2.json", run, "--max_steps", "2", check=False)
    assert result.returncode == 2
    assert f"config error: train.output_dir {run} already holds a run" in result.stderr
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before


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


def test_a_requeued_job_continues_its_own_run_once_it_has_a_checkpoint(tmp_path, monkeypatch):
    """launch/slurm_pretrain.sbatch sets FINECLIP_REQUEUED=1 on an allocation Slurm requeued: sbatch ... --resume
    PATH restarted from PATH, then stopped on meeting the run's own checkpoints. Before the run's first save
    it starts from PATH still, not from scratch."""
    start = str(_checkpoints(tmp_path / "a", [500], latest=500))
    own = tmp_path / "b" / "checkpoints"
    monkeypatch.setenv("FINECLIP_REQUEUED", "1")
    assert resume_of_a_requeued_job(start, own) == start  # died before its first save
    _checkpoints(tmp_path / "b", [20], latest=20)
    assert resume_of_a_requeued_job(start, own) == "auto"
    assert find_resume_point(resume_of_a_requeued_job(start, own), own) == ResumePoint(own, tag_for_step(20))
    monkeypatch.delenv("FINECLIP_REQUEUED")
    assert resume_of_a_requeued_job(start, own) == start  # not requeued: refused, as any second run would be
