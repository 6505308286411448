"""`launch/pretrain.py` turns bad arguments and DeepSpeed JSONs into exit 2 and one line, before a model is built."""
import json
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
