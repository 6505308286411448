"""The ablation CLI as outside checks run it: four loss sets, one record each in ablation.json."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fineclip_ds.ablation import LOSS_SETS, main

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_ablation_writes_one_record_per_loss_set(tmp_path, capsys):
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
    assert all(record["final_train_loss"] > 0 and record["eval_images"] == 16 for record in records)

    rerun = subprocess.run(command, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                           text=True, timeout=600)  # nothing left to train: the same records, the loss kept
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((tmp_path / "ablation.json").read_text()) == records
    with pytest.raises(SystemExit) as other:  # refused before any training: in this process, ~10 s less
        main(["--steps", "3", *command[5:]])
    assert other.value.code == 2
    assert f"--output_dir {tmp_path} holds an ablation with --steps 2 --seed 3" in " ".join(capsys.readouterr().err.split())


def test_a_loss_set_stopped_early_writes_no_table(tmp_path, monkeypatch, capsys):
    """A stop signal ended a loss set at step 9 of 20: it was evaluated anyway and the table said 20 steps."""
    import fineclip_ds.ablation as ablation

    def stopped_at_step_1(config, deepspeed_config):
        Path(config.train.output_dir).mkdir(parents=True)
        (Path(config.train.output_dir) / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')

    monkeypatch.setattr(ablation, "train", stopped_at_step_1)
    with pytest.raises(SystemExit) as exit_info:
        ablation.main(["--steps", "2", "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 1
    assert "L_GC stopped at step 1 of 2" in capsys.readouterr().err
    assert not (tmp_path / "ablation.json").exists()
    with pytest.raises(SystemExit) as exit_info:  # every loss set is evaluated at its last step, or not at all
        ablation.main(["--steps", "2", "--output_dir", str(tmp_path / "b"), "--set", "train.stop_at_step=1"])
    assert exit_info.value.code == 2 and "train.stop_at_step: got 1" in capsys.readouterr().err


def test_a_bad_setting_exits_like_pretrain_with_the_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--steps", "0", "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "config error: train.max_steps: got 0, expected an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-5"])
def test_ablation_refuses_an_eval_images_count_below_one_before_training(tmp_path, monkeypatch, capsys, value):
    """--eval_images 0 (or negative) was accepted: the first loss set trained all its steps, then its evaluation
    raised a bare ValueError ('no box to classify in 0 images'): a traceback after minutes of training."""
    import fineclip_ds.ablation as ablation

    def no_training(config, deepspeed_config):
        raise AssertionError("trained before --eval_images was checked")

    monkeypatch.setattr(ablation, "train", no_training)
    with pytest.raises(SystemExit) as exit_info:
        ablation.main(["--steps", "2", "--eval_images", value, "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--eval_images" in capsys.readouterr().err


@pytest.mark.parametrize("override", ["losses.w_sd=0", "losses.w_rc=0.5", "train.max_steps=7", "eval.every=5"])
def test_a_set_that_the_ablation_replaces_is_refused_not_silently_dropped(tmp_path, monkeypatch, capsys, override):
    """`--set losses.w_sd=0` was accepted, replaced by each loss set's own weights (L_GC+L_SD trained with w_sd=1),
    and still recorded in ablation.json's "overrides" as if it had applied."""
    import fineclip_ds.ablation as ablation

    def no_training(config, deepspeed_config):
        raise AssertionError(f"trained with --set {override} silently replaced")

    monkeypatch.setattr(ablation, "train", no_training)
    with pytest.raises(SystemExit) as exit_info:
        ablation.main(["--steps", "2", "--output_dir", str(tmp_path), "--set", override])
    assert exit_info.value.code == 2
    assert override.split("=")[0] in capsys.readouterr().err


def test_each_loss_set_trains_in_its_folder_under_an_output_dir_yaml_would_cut(tmp_path, monkeypatch):
    """The loss sets' folders were passed to the config as YAML: under `ablations/try #2`, ' #2/L_GC' was a
    comment, so every loss set trained in (and resumed from) `ablations/try`."""
    import fineclip_ds.ablation as ablation

    trained_in = []

    def stopped_at_step_1(config, deepspeed_config):
        trained_in.append(config.train.output_dir)
        Path(config.train.output_dir).mkdir(parents=True)
        (Path(config.train.output_dir) / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')

    monkeypatch.setattr(ablation, "train", stopped_at_step_1)
    with pytest.raises(SystemExit):
        ablation.main(["--steps", "2", "--output_dir", str(tmp_path / "try #2")])
    assert trained_in == [str(tmp_path / "try #2" / "L_GC")]
