"""A run resumed from a checkpoint older than its last logged step logs each step once, in
metrics.jsonl and in TensorBoard (a kill between checkpoints logs steps the resumed run repeats)."""
import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fineclip_ds.training.monitor import Monitor


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
