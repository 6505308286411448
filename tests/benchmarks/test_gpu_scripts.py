"""The GPU benchmark scripts run end to end in --smoke mode on the CPU (Triton in its interpreter).

A session that is lent a GPU has a few minutes of device time; these keep it from finding a Python
error there first. They check the shape of what each script writes, not its numbers.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SMOKE_LABEL = "CPU smoke run (numbers mean nothing)"


def run_smoke(script: str, output: Path, *extra: str) -> list[str]:
    """The table rows the script appended to `output`."""
    # on a GPU the kernels compile and launch for real at the smoke sizes; on a CPU they run interpreted
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, f"benchmarks/{script}", "--smoke", "--output", str(output), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    text = output.read_text()
    assert (SMOKE_LABEL in text) != torch.cuda.is_available()  # with a GPU, smoke sizes run there
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| ---")][1:]


def test_region_pooling_script_times_both_implementations_in_bf16(tmp_path):
    (row,) = run_smoke("gpu_roi_pool.py", tmp_path / "b.md")
    cells = row.strip("| ").split(" | ")
    assert cells[:4] == ["2", "3", "5 x 7", "24"]
    assert float(cells[11]) < 0.05  # Triton vs torchvision (pooled in fp32) on bf16 tokens
    # one channel tile (C = 24) has nothing to split: normalised in the kernel, the second pass timed too
    assert cells[12] == "kernel" and float(cells[13]) > 0
    text = (tmp_path / "b.md").read_text()
    assert "bitwise repeatable over 3 runs: yes" in text
    for name in ("triton", "torchvision"):  # where the smallest step's time goes, GPU kernels or launching them
        assert f"Profile: {name} at the smallest size, B = 2, R = 3, 5 x 7, C = 24: " in text


def test_contrastive_script_times_triton_and_clip_loss_against_an_fp32_reference(tmp_path):
    rows = run_smoke("gpu_contrastive.py", tmp_path / "b.md", "--tiles", "16x32x16")
    cells = {row.split(" | ")[2]: row.strip("| ").split(" | ") for row in rows}
    assert set(cells) >= {"triton", "triton_fused_bwd", "triton_striped_bwd", "triton_16x32x16", "torch_tiled",
                          "open_clip"}
    assert float(cells["triton_16x32x16"][-1]) < 1e-3
    assert float(cells["triton"][-1]) < 1e-3  # fp32 logits from bf16 inputs: as exact as the fp32 reference
    text = (tmp_path / "b.md").read_text()
    assert "Triton backward bitwise repeatable: yes" in text
    for name in ("open_clip", "triton"):  # where the smallest step's time goes, GPU kernels or launching them
        assert f"Profile: {name} at N = 48, D = 40: " in text


def test_training_step_script_runs_each_backend_with_and_without_checkpointing(tmp_path):
    rows = run_smoke("gpu_training_step.py", tmp_path / "b.md")
    settings = [tuple(row.strip("| ").split(" | ")[1:3]) for row in rows]
    assert settings == [("sdpa", "False"), ("sdpa", "True"), ("math", "False"), ("math", "True")]
    assert all(float(row.split(" | ")[4]) > 0 for row in rows)  # samples/s


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would run the whole benchmark")
@pytest.mark.parametrize("script", ["gpu_roi_pool.py", "gpu_contrastive.py", "gpu_training_step.py"])
def test_without_a_gpu_or_smoke_the_scripts_exit_saying_what_to_do(script, tmp_path):
    done = subprocess.run([sys.executable, f"benchmarks/{script}", "--output", str(tmp_path / "b.md")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "--smoke" in done.stderr
    assert not (tmp_path / "b.md").exists()


def test_contrastive_script_refuses_tile_shapes_the_kernels_cannot_take(capsys):
    from benchmarks.gpu_contrastive import parse_args
    assert parse_args(["--tiles", "128x64x32"]).tiles == [(128, 64, 32)]
    for bad in ("100x64x64", "128x64", "8x16x16"):
        with pytest.raises(SystemExit):
            parse_args(["--tiles", bad])
        assert "expected MxNxK with powers of two >= 16" in capsys.readouterr().err


def test_an_implementation_that_raises_gets_an_error_row_and_the_sweep_goes_on(tmp_path, monkeypatch):
    """On the first H100 run inf-cl raised at N = 4096 and the script ended there: every later size went
    unmeasured. A fault of one implementation is now its row; the others and the sizes after it still run."""
    import benchmarks.gpu_contrastive as script
    from benchmarks.gpu_runs import MarkdownSection

    def measure(name, rows, dim, device, repeat_budget_s):
        if name == "triton_fused_bwd" and rows == 48:
            raise RuntimeError("a baseline's fault")
        return {"loss": 1.0, "forward_ms": 1.0, "peak_bytes": 2**20, "step_ms": 2.0}

    monkeypatch.setattr(script, "measure", measure)
    monkeypatch.setattr(script, "reference_loss", lambda rows, dim, device: 1.0)
    monkeypatch.setattr(script, "triton_is_deterministic", lambda rows, dim, device: True)
    section = MarkdownSection(tmp_path / "b.md", "## t", "notes", script.COLUMNS)
    failed = []
    assert script.sweep([48, 64], [40], torch.device("cpu"), 0.0, section, (), failed)
    rows = [line.strip("| ").split(" | ") for line in (tmp_path / "b.md").read_text().splitlines()
            if line.startswith("| 48 ") or line.startswith("| 64 ")]
    assert ["48", "40", "triton_fused_bwd", "error: RuntimeError", "error: RuntimeError", "-", "-", "-"] in rows
    assert {row[2] for row in rows if row[0] == "64"} >= {"triton", "triton_fused_bwd", "torch_tiled"}
    assert failed == ["triton_fused_bwd at N = 48, D = 40"]
