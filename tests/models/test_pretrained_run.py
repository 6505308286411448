"""model.pretrained given a fineclip_ds run (pre-train, then fine-tune): the weights export would write."""
import json
import re
import weakref

import open_clip
import pytest
import torch

from fineclip_ds.config import ConfigError, ModelConfig
from fineclip_ds.evaluate import load_for_evaluation
from fineclip_ds.export import export
from fineclip_ds.models.factory import create_fineclip, patch_grid, resample_positional_grid
from fineclip_ds.models.fineclip import LOGIT_SCALE_MAX
from tests.training.launcher import losses, run_pretrain, write_ds_config

pytestmark = pytest.mark.slow
NAME = "FineCLIP-ViT-T-8"  # the reference runs' model, trained at its own 64 px (an 8 x 8 grid)
FINE_TUNE_SIZE = [48, 80]


def _exported(checkpoint, tmp_path) -> tuple[dict[str, torch.Tensor], dict]:
    """The export-then-load path: export's state dict and the model config it writes beside it."""
    _, path = export(checkpoint, tmp_path / "exported.pt")
    return torch.load(path, weights_only=True), json.loads(path.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def fine_tuned(runs, tmp_path_factory):
    """launch/pretrain.py fine-tuning the one-process ZeRO-2 run at another, non-square size for 2 steps. A
    learning rate of 1e-30 moves no fp32 weight: its checkpoint keeps the weights it started from."""
    root = tmp_path_factory.mktemp("fine_tune")
    config = write_ds_config(root / "ds.json", micro_batch=8, stage=2)
    result = run_pretrain(1, config, root / "run", "--max_steps", "2", "--set", f"model.pretrained={runs['one_zero2']}",
                          "--set", f"model.image_size={FINE_TUNE_SIZE}", "--set", "optim.lr=1e-30",
                          "--set", "optim.warmup_steps=0", "--set", "train.save_every=2", "--set", "data.max_boxes=4",
                          check=False)
    return root / "run", result


def test_pretrain_fine_tunes_from_a_run_folder_given_as_model_pretrained(runs, fine_tuned, tmp_path):
    run, result = fine_tuned
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert [step for step, _ in losses(run)] == [1, 2]
    printed = result.stdout + result.stderr  # open_clip's notice of a random init would be false here
    assert "initialized randomly" not in printed and f"model.pretrained {runs['one_zero2']} loaded into" in printed
    started_from, _, _ = create_fineclip(ModelConfig(pretrained=str(runs["one_zero2"]), image_size=FINE_TUNE_SIZE))
    saved, _ = _exported(run, tmp_path)
    for key, value in started_from.clip.state_dict().items():
        torch.testing.assert_close(saved[key].reshape(value.shape), value, rtol=0, atol=1e-20)


@pytest.mark.parametrize("run_name,form", [("one_zero2", "run"), ("two_zero3", "checkpoints"), ("two_zero3", "tag")])
def test_a_run_given_as_pretrained_loads_the_weights_export_writes(runs, tmp_path, run_name, form):
    """ZeRO-2 and ZeRO-3, each form evaluate's --checkpoint takes; the logit scale capped as export caps it."""
    run = runs[run_name]
    checkpoints = run / "checkpoints"
    checkpoint = {"run": run, "checkpoints": checkpoints,
                  "tag": checkpoints / (checkpoints / "latest").read_text().strip()}[form]
    model, _, _ = create_fineclip(ModelConfig(pretrained=str(checkpoint)))
    expected, _ = _exported(checkpoint, tmp_path)
    loaded = model.clip.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key].reshape(value.shape), value), key
    assert loaded["logit_scale"].item() <= LOGIT_SCALE_MAX


def test_a_zero3_run_is_gathered_one_tensor_at_a_time(runs, monkeypatch):
    """Every rank builds its model from the run: gathering all its tensors before loading them held the weights
    twice (peak memory: benchmarks/bench_pretrained_memory.py). Counted here as the gathered tensors alive at once,
    which does not depend on timing or on the machine."""
    from deepspeed.utils.zero_to_fp32 import GatheredTensor

    gather, gathered, most_alive = GatheredTensor.contiguous, [], 0

    def counted(lazy: GatheredTensor) -> torch.Tensor:
        nonlocal most_alive
        tensor = gather(lazy)
        gathered.append(weakref.ref(tensor))
        most_alive = max(most_alive, sum(ref() is not None for ref in gathered))
        return tensor

    monkeypatch.setattr(GatheredTensor, "contiguous", counted)
    model, _, _ = create_fineclip(ModelConfig(pretrained=str(runs["two_zero3"])))
    assert len(gathered) == len(model.clip.state_dict())  # every weight came from the shards
    assert most_alive == 1


@pytest.mark.parametrize("trained_at,size", [(None, FINE_TUNE_SIZE), (FINE_TUNE_SIZE, None)],
                         ids=["native-run-at-48x80", "48x80-run-at-native"])
def test_a_run_at_another_size_resamples_its_table_from_the_grid_it_trained_at(runs, fine_tuned, tmp_path,
                                                                               trained_at, size):
    """The run's config.json says the size it trained at; the table equals the export-then-load path's."""
    run = fine_tuned[0] if trained_at else runs["one_zero2"]
    model, _, _ = create_fineclip(ModelConfig(pretrained=str(run), image_size=size))
    expected, model_config = _exported(run, tmp_path)
    vision = model_config["vision_cfg"]
    assert vision["image_size"] == (trained_at or 64)
    table = resample_positional_grid(expected["visual.positional_embedding"],
                                     patch_grid(vision["image_size"], vision["patch_size"]),
                                     patch_grid(size or 64, vision["patch_size"]))
    torch.testing.assert_close(model.visual.positional_embedding, table, rtol=0, atol=0)
    evaluated, _, _ = load_for_evaluation(tmp_path / "exported.pt", NAME, image_size=size or 64)
    torch.testing.assert_close(model.visual.positional_embedding, evaluated.visual.positional_embedding, rtol=0, atol=0)
    torch.testing.assert_close(model.visual.proj, expected["visual.proj"], rtol=0, atol=0)


def test_a_run_of_another_model_is_a_config_error_naming_both(runs):
    run = runs["one_zero2"]
    with pytest.raises(ConfigError, match=re.escape(f"model.name: got 'FineCLIP-ViT-T-16-224', but model.pretrained "
                                                    f"{run} is a run of '{NAME}'; expected '{NAME}'")):
        create_fineclip(ModelConfig(name="FineCLIP-ViT-T-16-224", pretrained=str(run)))


def test_a_run_without_its_config_loaded_as_another_model_is_a_config_error_naming_the_keys(runs, tmp_path):
    """Without the run's config.json nothing names the model it trained: the keys are compared before any is read."""
    checkpoints = runs["one_zero2"] / "checkpoints"
    tag = (checkpoints / "latest").read_text().strip()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text(tag)
    (tmp_path / "checkpoints" / tag).symlink_to(checkpoints / tag)
    with pytest.raises(ConfigError, match=re.escape("does not load into model.name 'FineCLIP-ViT-T-16-224'") +
                       r".*nexpected key.*visual\.transformer\.resblocks\.2\."):
        create_fineclip(ModelConfig(name="FineCLIP-ViT-T-16-224", pretrained=str(tmp_path / "checkpoints")))


@pytest.mark.parametrize("run_name,file_name", [("one_zero2", "mp_rank_00_model_states.pt"),
                                                ("two_zero3", "zero_pp_rank_0_mp_rank_00_model_states.pt")])
def test_a_deepspeed_model_states_file_is_refused_naming_its_tag_folder(runs, run_name, file_name):
    """open_clip read its 'module' dict as missing every key ("does not load ... another architecture?"); under
    ZeRO-3 it holds no weights at all, and under ZeRO-2 those of the training precision."""
    checkpoints = runs[run_name] / "checkpoints"
    tag = checkpoints / (checkpoints / "latest").read_text().strip()
    message = (f"model.pretrained: got '{tag / file_name}', a DeepSpeed model-states file, whose weights are in the "
               "training precision, or under ZeRO-3 not in it at all (each rank's shard is in its own file); expected "
               f"the tag folder it lies in (model.pretrained={tag}), or one file made with: python -m fineclip_ds.export "
               f"--checkpoint {tag} --output fineclip.pt")
    with pytest.raises(ConfigError, match=re.escape(message)):
        create_fineclip(ModelConfig(pretrained=str(tag / file_name)))


@pytest.mark.parametrize("size", [None, FINE_TUNE_SIZE], ids=["native", "48x80"])
def test_a_fineclip_state_dict_file_loads_its_clip_weights(tmp_path, size):
    """torch.save(model.state_dict()) of a FineCLIP: its keys are 'clip.*', which open_clip reported as missing."""
    torch.manual_seed(0)
    model, _, _ = create_fineclip(ModelConfig(image_size=size))
    with torch.no_grad():
        model.clip.logit_scale.fill_(4.7)  # above ln(100), where the capped temperature leaves it
    torch.save(model.state_dict(), tmp_path / "fineclip_state.pt")
    loaded, _, _ = create_fineclip(ModelConfig(pretrained=str(tmp_path / "fineclip_state.pt"), image_size=size))
    for key, value in model.clip.state_dict().items():
        expected = value.clamp(max=LOGIT_SCALE_MAX) if key == "logit_scale" else value
        torch.testing.assert_close(loaded.clip.state_dict()[key], expected, rtol=0, atol=0)
    reference = open_clip.create_model(NAME, force_image_size=tuple(size) if size else None)
    assert loaded.clip.state_dict().keys() == reference.state_dict().keys()
