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
    ("NVIDIA GeForce RTX 4090", None),
    ("cpu", None),
])
def test_mfu_peaks_tell_the_pcie_and_nvl_cards_from_the_sxm_parts(device_name, peak):
    assert peak_tflops(device_name) == peak
