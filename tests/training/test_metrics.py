import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fineclip_ds.training.metrics import peak_tflops
from tests.training.launcher import run_pretrain, write_ds_config

RANK_METRICS_SCRIPT = Path(__file__).with_name("rank_metrics_pretrain.py")
SLOW_FIRST_BATCH_SCRIPT = Path(__file__).with_name("slow_first_batch_pretrain.py")
FIRST_BATCH_DELAY_S = 5.0


@pytest.mark.parametrize("device_name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA B200", 2250.0),
    ("NVIDIA GB200", 2500.0),
    ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA H800", 989.0),
    ("NVIDIA H800 PCIe", 756.0),
    ("NVIDIA GeForce RTX 4090", None),
    ("cpu", None),
])
def test_mfu_peaks_tell_the_pcie_and_nvl_cards_from_the_sxm_parts(device_name, peak):
    assert peak_tflops(device_name) == peak


def test_paused_time_counts_in_no_throughput_window(monkeypatch):
    """Evaluation and checkpoint saves run between steps; their time must not lower TFLOP/s and MFU."""
    from fineclip_ds.training import metrics

    clock = iter([0.0, 10.0, 40.0, 50.0, 50.0])  # start, pause begins, pause ends, read, next window
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    throughput = metrics.Throughput()
    throughput.update(samples=8, flops=10**12)
    with throughput.paused():
        pass
    speed = throughput.read()
    assert speed["step_time_s"] == 20.0 and speed["tflops_per_device"] == pytest.approx(1 / 20)


def test_run_totals_weigh_each_start_by_its_time_and_world_size():
    """A run on 2 ranks for 10 steps (20 s, 2 TFLOP/s per device), resumed on 1 rank for 10 more (30 s,
    1 TFLOP/s): 20 steps in 50 s; TFLOP/s per device = 110 TFLOP / 70 device-seconds, not a mean of rates."""
    from fineclip_ds.training.metrics import RunTotals

    first = {"steps": 10, "samples_per_s": 4.0, "step_time_s": 2.0, "tflops_per_device": 2.0, "peak_memory_mb": 900.0}
    second = {"steps": 10, "samples_per_s": 2.0, "step_time_s": 3.0, "tflops_per_device": 1.0, "peak_memory_mb": 700.0}
    carried = RunTotals.from_state(RunTotals().plus(first, world_size=2).state_dict())  # through a checkpoint
    figures = carried.plus(second, world_size=1).figures()
    assert figures["steps"] == 20 and figures["starts"] == 2
    assert figures["samples_per_s"] == pytest.approx((80 + 60) / 50)
    assert figures["step_time_s"] == pytest.approx(2.5)
    assert figures["tflops_per_device"] == pytest.approx((2.0 * 20 * 2 + 1.0 * 30) / (20 * 2 + 30))
    assert figures["peak_memory_mb"] == 900.0


@pytest.mark.slow
def test_tflops_are_averaged_over_ranks_and_peak_memory_is_the_highest_rank(tmp_path):
    """2 ranks doing 1 and 2 TFLOP per step with 1000 and 2000 MB peaks: a device did 1.5 TFLOP per step
    on average and the run needs 2000 MB; rank 0's own figures (1 TFLOP, 1000 MB) were logged before."""
    output_dir = tmp_path / "run"
    result = run_pretrain(2, write_ds_config(tmp_path / "ds.json", micro_batch=4, stage=2), output_dir,
                          "--max_steps", "2", "--set", "data.max_boxes=4", script=RANK_METRICS_SCRIPT)
    # a run-wide warning both ranks meet (zero2.json's bf16 on a CPU) is printed once, by rank 0
    fallback = [line for line in result.stderr.splitlines() if "bf16 is enabled in the DeepSpeed config" in line]
    assert len(fallback) == 1 and " rank 0 " in fallback[0], fallback
    events = EventAccumulator(str(output_dir / "tensorboard"))
    events.Reload()
    step_times = [event.value for event in events.Scalars("perf/step_time_s")]
    for event, step_time in zip(events.Scalars("perf/tflops_per_device"), step_times, strict=True):
        # TFLOP per step (TensorBoard keeps float32)
        assert event.value * step_time == pytest.approx(1.5, rel=1e-5), event.step
    assert [event.value for event in events.Scalars("perf/peak_memory_mb")] == [2000.0, 2000.0]
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["tflops_per_device"] * summary["step_time_s"] == pytest.approx(1.5, rel=1e-9)
    assert summary["peak_memory_mb"] == 2000.0
    # the data counts of the run, over both ranks (they were only in TensorBoard and the console)
    assert summary["data"]["samples"] == 2 * 2 * 4 and summary["data"]["regions"] <= 2 * 2 * 4 * 4


@pytest.mark.slow
def test_the_data_streams_start_up_counts_in_no_window(tmp_path):
    """A stream whose first batch arrives 5 s late (a DataLoader starting, a resume fast-forwarding through the
    records its shards had given): that wait is not training, and the first window's step time and the run's
    time leave it out. Before, the first window logged the wait plus the step (3.2-4.3 s with a 3 s wait, CPU, 1 rank)."""
    output_dir = tmp_path / "run"
    run_pretrain(1, write_ds_config(tmp_path / "ds.json", micro_batch=4, stage=2), output_dir,
                 "--max_steps", "2", "--set", "train.log_every=1", script=SLOW_FIRST_BATCH_SCRIPT,
                 env={"FIRST_BATCH_DELAY_S": str(FIRST_BATCH_DELAY_S)})
    events = EventAccumulator(str(output_dir / "tensorboard"))
    events.Reload()
    first_window = events.Scalars("perf/step_time_s")[0]
    assert first_window.step == 1 and first_window.value < FIRST_BATCH_DELAY_S, first_window
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["step_time_s"] * summary["steps"] < FIRST_BATCH_DELAY_S, summary
