"""A run resumed from a checkpoint older than its last logged step logs each step once, in
metrics.jsonl and in TensorBoard (a kill between checkpoints logs steps the resumed run repeats)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fineclip_ds.training.monitor import Monitor

REPO = Path(__file__).resolve().parents[2]


def _run(output_dir, start_step: int, last_step: int, loss_offset: float) -> None:
    monitor = Monitor(output_dir, total_steps=last_step, start_step=start_step, enabled=True)
    for step in range(start_step + 1, last_step + 1):
        monitor.step(step, loss_offset + step, None)
        monitor.scalars(step, {"loss/total": loss_offset + step})
    monitor.close()


def test_steps_logged_past_the_checkpoint_are_replaced_by_the_resumed_runs(tmp_path):
    _run(tmp_path, start_step=0, last_step=6, loss_offset=0.0)  # killed after logging step 6, saved at 3
    _run(tmp_path, start_step=3, last_step=6, loss_offset=100.0)  # resumed at 3
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 104.0), (5, 105.0), (6, 106.0)]
    assert [(entry["step"], entry["loss"]) for entry in logged] == expected
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("loss/total")] == expected


def test_a_line_cut_off_by_a_crash_does_not_stop_the_resume(tmp_path):
    """A node lost (or a full disk) while metrics.jsonl was written leaves a partial last line: the resumed
    run drops it with the other steps past its checkpoint instead of failing to parse it, and its own lines
    start on a line of their own."""
    _run(tmp_path, start_step=0, last_step=4, loss_offset=0.0)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 5, "lo')  # saved at 4, cut off while logging step 5
    _run(tmp_path, start_step=4, last_step=6, loss_offset=100.0)
    logged = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [(entry["step"], entry["loss"]) for entry in logged] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0),
                                                                      (5, 105.0), (6, 106.0)]


def _pretrain(output_dir: Path, *args: str) -> str:
    """One process, no launcher: the world of one that launch/pretrain.py sets up by itself. Returns its stderr."""
    done = subprocess.run([sys.executable, str(REPO / "launch" / "pretrain.py"), "--deepspeed_config",
                           str(REPO / "ds_configs" / "zero2.json"), "--output_dir", str(output_dir), "--max_steps", "2",
                           "--set", "data.num_workers=0", "--set", "data.max_boxes=4", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # slow on shared CPUs
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


@pytest.mark.slow
def test_a_resume_with_no_step_left_keeps_the_runs_summary(tmp_path):
    """--resume auto of a finished run (launch/slurm_pretrain.sbatch always passes it; a requeued or resubmitted
    job meets a finished run) trains nothing: summary.json keeps the run's figures, not 0 samples/s."""
    _pretrain(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["samples_per_s"] > 0
    _pretrain(tmp_path, "--resume", "auto")
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    # a stop_at_step the run has passed is more likely a mistake than a finished run: said as a warning
    stopped_before = _pretrain(tmp_path, "--resume", "auto", "--set", "train.stop_at_step=1")
    assert "train.stop_at_step=1 is not after step 2, which this run resumed at: nothing was trained" in stopped_before
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


@pytest.mark.slow
def test_a_resumed_runs_summary_covers_all_its_steps_and_each_bar_ends_at_its_stop(tmp_path):
    """A job stopped early (train.stop_at_step, as a cluster time slot asks) and resumed: its bar counts to
    the step it stops at, and summary.json describes the run's 2 steps over 2 starts, not the last start."""
    first = _pretrain(tmp_path, "--set", "train.stop_at_step=1")
    assert re.search(r"train: 100%\S* 1/1 ", first), first[-2000:]
    second = _pretrain(tmp_path, "--resume", "auto")
    assert re.search(r"train: 100%\S* 2/2 ", second), second[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["steps"], summary["starts"]) == (2, 2)
    deepspeed = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    samples_per_step = deepspeed["train_micro_batch_size_per_gpu"] * deepspeed.get("gradient_accumulation_steps", 1)
    assert summary["samples_per_s"] * summary["step_time_s"] == pytest.approx(samples_per_step)


def test_logs_that_cannot_be_written_are_reported_once_and_training_goes_on(tmp_path, caplog):
    """A full disk between checkpoints (or the run folder moved) raised out of the TensorBoard writer or the
    metrics file and stopped the run, losing every step since its last checkpoint."""
    monitor = Monitor(tmp_path, total_steps=4, start_step=0, enabled=True)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monitor._jsonl.write = full_disk
    monitor._writer.add_scalar = full_disk
    for step in (1, 2, 3):
        monitor.step(step, 1.0, None)
        monitor.scalars(step, {"loss/total": 1.0})
    monitor.summary({"steps": 3.0})
    monitor.close()
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 2 and all("No space left on device" in error for error in errors)
    assert errors[0].startswith("cannot write metrics.jsonl") and errors[1].startswith("cannot write tensorboard/")
    assert json.loads((tmp_path / "summary.json").read_text()) == {"steps": 3.0}  # what can be written still is
