"""One output folder holds one run's history: a second run is refused, an older resume point keeps what came after."""
import logging
import shutil
from pathlib import Path

import pytest

from fineclip_ds.config import ConfigError
from fineclip_ds.training.checkpoint import ResumePoint, _prune, find_resume_point, tag_for_step
from tests.training.launcher import REPO, run_pretrain


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
    assert point == ResumePoint(checkpoints, tag_for_step(10))
    assert "step_00000020, step_00000030 of later steps exist(s)" in caplog.text


def test_pruning_keeps_the_saved_tag_and_leaves_later_steps_alone(tmp_path):
    """Resumed from step 10 with keep_last=1: the old code kept the highest tags (30) and deleted the one
    just saved, which `latest` names: the next resume failed."""
    checkpoints = _checkpoints(tmp_path / "run", [8, 10, 11, 20, 30], latest=11)
    (checkpoints / (tag_for_step(8) + "_universal")).mkdir()
    _prune(checkpoints, tag_for_step(11), keep_last=1)
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == [tag_for_step(s) for s in (11, 20, 30)]


def test_the_trainer_refuses_a_second_run_into_a_run_folder_and_changes_nothing(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["one_zero2"], run)
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    result = run_pretrain(1, REPO / "ds_configs" / "zero2.json", run, "--max_steps", "2", check=False)
    assert result.returncode == 2
    assert f"config error: train.output_dir {run} already holds a run" in result.stderr
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before
