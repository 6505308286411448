"""`launch/pretrain.py` turns bad arguments and DeepSpeed JSONs into exit 2 and one line, before a model is built."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("args,message", [
    # a world of 0 GPUs was planned as 1, -2 with negative memory
    (["--dry_run", "--world_size", "0"], "argument --world_size: got 0, expected an integer >= 1"),
    # DeepSpeed asserted on it only after the model was built
    (["--max_steps", "1"], "config error: train_batch_size=100 is not train_micro_batch_size_per_gpu=32"),
])
def test_bad_arguments_exit_2_with_a_message(tmp_path, args, message):
    ds_config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    (tmp_path / "ds.json").write_text(json.dumps({**ds_config, "train_batch_size": 100}))
    result = subprocess.run([sys.executable, "launch/pretrain.py", "--deepspeed_config", str(tmp_path / "ds.json"),
                             "--output_dir", str(tmp_path / "run"), *args], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("field", ["kernels.region_pool", "kernels.contrastive"])
def test_a_triton_kernel_on_a_machine_without_cuda_exits_2_at_start(tmp_path, field):
    """It started training and failed at the first step, one traceback per rank. Not refused by config
    validation: --dry_run plans GPU runs from a laptop."""
    no_gpu = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "launch/pretrain.py", "--deepspeed_config", "ds_configs/zero2.json",
                             "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--set", f"{field}=triton"],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**no_gpu, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2 and f"config error: {field}: got 'triton'" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_triton_kernels_are_accepted_where_they_run():
    """On CUDA; on the CPU too where the kernels were imported under the interpreter (these tests, without a GPU)."""
    import torch

    from fineclip_ds.config import KernelConfig
    from fineclip_ds.training.engine import require_kernel_devices
    from kernels.roi_pool.launch import INTERPRETED

    triton = KernelConfig(region_pool="triton", contrastive="triton")
    require_kernel_devices(triton, torch.device("cuda"))
    if INTERPRETED:
        require_kernel_devices(triton, torch.device("cpu"))


@pytest.mark.parametrize("where", ["is_a_file", "under_a_file"])
def test_an_output_dir_that_cannot_be_written_exits_2_before_the_model_is_built(tmp_path, where):
    """It failed after the model and DeepSpeed were built, with a traceback per rank."""
    (tmp_path / "taken").write_text("a file")
    output_dir = tmp_path / "taken" / ("run" if where == "under_a_file" else "")
    result = subprocess.run([sys.executable, "launch/pretrain.py", "--deepspeed_config", "ds_configs/zero2.json",
                             "--output_dir", str(output_dir), "--max_steps", "1"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"config error: train.output_dir {str(output_dir).rstrip('/')}: cannot write there ([Errno" in result.stderr
    assert "Traceback" not in result.stderr and "model.pretrained" not in result.stderr
