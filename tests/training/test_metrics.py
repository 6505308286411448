import pytest

from fineclip_ds.training.metrics import peak_tflops


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
