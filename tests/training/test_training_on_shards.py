"""A real (1-process) DeepSpeed run on webdataset shards with defects: it trains, skips and counts them."""
from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fineclip_ds.data.shapes_world import ShapesWorld
from fineclip_ds.training.optimizer import warmup_cosine
from tests.data.helpers import defective_records, world_records, write_shard
from tests.training.launcher import losses, run_pretrain, write_ds_config

pytestmark = pytest.mark.slow


def test_trains_on_shards_and_reports_every_defect_to_tensorboard(tmp_path):
    world = ShapesWorld(seed=5, image_size=64)
    write_shard(tmp_path / "part-0.tar", world_records(world, range(0, 10)) + defective_records())
    # part-1 as a writer rerun that appended to it leaves it: 000010 written again after 000019
    write_shard(tmp_path / "part-1.tar", world_records(world, range(10, 20)) + world_records(world, range(10, 11)))
    (tmp_path / "part-2.tar").write_bytes(b"garbage" * 100)
    output_dir = tmp_path / "run"
    run_pretrain(1, write_ds_config(tmp_path / "ds.json", micro_batch=8, stage=2), output_dir,
                 "--max_steps", "4", "--set", "data.source=webdataset",
                 "--set", f"data.train_shards={tmp_path}/part-{{0..2}}.tar", "--set", "train.save_every=4")
    assert [step for step, _ in losses(output_dir)] == [1, 2, 3, 4]
    events = EventAccumulator(str(output_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/total", "loss/gc", "loss/sd", "loss/rc", "train/lr", "perf/samples_per_s"} <= tags

    optim = json.loads((output_dir / "config.json").read_text())["optim"]
    for event in events.Scalars("train/lr"):  # the lr step s trained with, not the one after it
        applied = optim["lr"] * warmup_cosine(event.step - 1, optim["warmup_steps"], 4, optim["min_lr_ratio"])
        assert event.value == pytest.approx(applied, rel=1e-6), event.step

    def last(tag: str) -> float:
        return events.Scalars(tag)[-1].value

    # 4 steps x 8 samples = 32 > 21 usable records: the run went through the defects at least once
    assert last("data/corrupt_image") >= 1 and last("data/missing_image") >= 1 and last("data/bad_json") >= 1
    assert last("data/region_captions_mismatch") >= 1
    assert last("data/box_non_positive") >= 1 and last("data/box_outside") >= 1 and last("data/corrupt_shard") >= 1
    assert last("data/repeated_key") >= 1
    assert (output_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"


def test_teacher_crops_from_a_higher_resolution_source_train(tmp_path):
    world = ShapesWorld(seed=6, image_size=128)
    write_shard(tmp_path / "part-0.tar", world_records(world, range(0, 16)))
    output_dir = tmp_path / "run"
    run_pretrain(1, write_ds_config(tmp_path / "ds.json", micro_batch=8, stage=2), output_dir,
                 "--max_steps", "2", "--set", "data.source=webdataset", "--set", f"data.train_shards={tmp_path}/part-0.tar",
                 "--set", "losses.crop_source_scale=2")
    assert [step for step, _ in losses(output_dir)] == [1, 2]
    assert json.loads((output_dir / "config.json").read_text())["losses"]["crop_source_scale"] == 2


def test_shards_too_small_for_a_batch_stop_with_a_message_not_a_worker_traceback(tmp_path):
    """Raised in a DataLoader worker, the error came back as the worker's traceback (about 30 lines per rank)."""
    write_shard(tmp_path / "part-0.tar", world_records(ShapesWorld(seed=7, image_size=64), range(0, 5)))
    result = run_pretrain(1, write_ds_config(tmp_path / "ds.json", micro_batch=8, stage=2), tmp_path / "run",
                          "--max_steps", "2", "--set", "data.source=webdataset", "--set", "data.num_workers=1",
                          "--set", f"data.train_shards={tmp_path}/part-0.tar", check=False)
    assert result.returncode == 2
    assert (f"data error: shards ['{tmp_path}/part-0.tar'] hold 5 usable records, fewer than one local batch of 8"
            in result.stderr)
    assert "Traceback" not in result.stderr and "Caught DataError in DataLoader worker" not in result.stderr


def test_shards_whose_boxes_sit_under_another_member_name_are_warned_about_and_counted(tmp_path):
    """`regions.json` instead of `json`: the run trained as plain CLIP (loss/sd = loss/rc = 0) without a word."""
    records = world_records(ShapesWorld(seed=8, image_size=64), range(0, 16))
    for record in records:
        record["regions.json"] = record.pop("json")
    write_shard(tmp_path / "part-0.tar", records)
    output_dir = tmp_path / "run"
    result = run_pretrain(1, write_ds_config(tmp_path / "ds.json", micro_batch=8, stage=2), output_dir,
                          "--max_steps", "2", "--set", "data.source=webdataset",
                          "--set", f"data.train_shards={tmp_path}/part-0.tar")
    assert "no region in the 8 samples of the first 1 step(s): loss/sd and loss/rc train nothing" in result.stderr
    assert "'no_region_json': 8" in result.stderr
    events = EventAccumulator(str(output_dir / "tensorboard"))
    events.Reload()
    assert events.Scalars("data/no_region_json")[-1].value == 16


def test_a_rank_whose_shards_are_too_small_stops_the_job_instead_of_leaving_its_peer_waiting(tmp_path):
    """Only one rank's data fails, while the other waits for it in the first step's collectives: the failing
    rank exits without tearing the process group down (which may wait for that peer), the launcher ends the
    job. A guard against a hang: the old code, which tore the group down, also ended here (71 s, 48 s now)."""
    world = ShapesWorld(seed=9, image_size=64)
    write_shard(tmp_path / "part-0.tar", world_records(world, range(0, 24)))
    write_shard(tmp_path / "part-1.tar", world_records(world, range(24, 27)))
    result = run_pretrain(2, write_ds_config(tmp_path / "ds.json", micro_batch=8, stage=2), tmp_path / "run",
                          "--max_steps", "2", "--set", "data.source=webdataset",
                          "--set", f"data.train_shards={tmp_path}/part-{{0..1}}.tar", check=False, timeout=240)
    assert result.returncode != 0
    assert "hold 3 usable records, fewer than one local batch of 8" in result.stderr
