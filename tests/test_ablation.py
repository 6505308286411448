"""The ablation CLI as outside checks run it: four loss sets, one record each in ablation.json."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fineclip_ds.ablation import LOSS_SETS

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_ablation_writes_one_record_per_loss_set(tmp_path):
    command = [sys.executable, "-m", "fineclip_ds.ablation", "--steps", "2", "--seed", "3", "--output_dir", str(tmp_path),
               "--eval_images", "16", "--set", "data.num_workers=0"]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads((tmp_path / "ablation.json").read_text())
    assert [record["losses"] for record in records] == list(LOSS_SETS)
    for record in records:
        assert record["steps"] == 2 and record["seed"] == 3
        for key in ("box_top1", "box_top5", "crop_top1", "i2t_r1", "t2i_r1"):
            assert 0.0 <= record[key] <= 100.0
    assert records[0]["weights"] == {"w_gc": 1.0, "w_sd": 0.0, "w_rc": 0.0}
    assert "| L_GC+L_SD+L_RC |" in (tmp_path / "ablation.md").read_text()
    # each loss set trained with its own weights
    assert json.loads((tmp_path / "L_GC" / "config.json").read_text())["losses"]["w_rc"] == 0.0


def test_a_bad_setting_exits_like_pretrain_with_the_message(tmp_path, capsys):
    from fineclip_ds.ablation import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--steps", "0", "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "config error: train.max_steps: got 0, expected an integer >= 1" in capsys.readouterr().err
