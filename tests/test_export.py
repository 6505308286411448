"""Export from ZeRO-2 and ZeRO-3 checkpoints to one open_clip state dict that open_clip loads by itself."""
import json
import shutil

import open_clip
import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from fineclip_ds.config import LossConfig, ModelConfig, KernelConfig
from fineclip_ds.export import export, main, resolve_checkpoint, training_to_open_clip
from fineclip_ds.losses.objective import FineCLIPObjective
from fineclip_ds.models.factory import create_fineclip
from fineclip_ds.training.checkpoint import PARTIAL_SUFFIX, REPLACED_SUFFIX, ResumePoint, convert_to_universal

pytestmark = pytest.mark.slow


def _training_model(run_dir):
    """The model as training held it: the objective's module tree, filled from the consolidated fp32 state."""
    source = resolve_checkpoint(run_dir)
    model, tokenizer, _ = create_fineclip(ModelConfig(name="FineCLIP-ViT-T-8", freeze_text=False))
    objective = FineCLIPObjective(model, LossConfig(), KernelConfig())
    objective.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(source.path), tag=source.tag), strict=True)
    return model.eval(), tokenizer


@pytest.mark.parametrize("run_name", ["one_zero2", "two_zero3"])
def test_exported_state_dict_loads_in_open_clip_and_gives_the_training_features(runs, tmp_path, run_name):
    name, path = export(runs[run_name], tmp_path / "fineclip.pt")
    assert name == "FineCLIP-ViT-T-8"
    assert json.loads(path.with_suffix(".json").read_text())["embed_dim"] == 64
    # plain tensors, as a module's state_dict() gives: zero_to_fp32's came with requires_grad=True
    assert not any(tensor.requires_grad for tensor in torch.load(path, weights_only=True).values())
    open_clip.add_model_config(path.with_suffix(".json"))  # as the README tells a plain open_clip user
    clip, _, preprocess = open_clip.create_model_and_transforms(path.stem, pretrained=str(path))
    clip.eval()
    trained, tokenizer = _training_model(runs[run_name])
    images = torch.randn(3, 3, 64, 64)
    tokens = tokenizer(["a red circle", "a photo of a blue square and a cyan diamond", "x"])
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(images, normalize=True), trained.encode_image(images),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(clip.encode_text(tokens, normalize=True), trained.encode_text(tokens),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(clip.logit_scale.exp().reshape(1), trained.logit_scale())


def test_the_exported_temperature_is_the_capped_one_training_used():
    state = {"model.clip.logit_scale": torch.tensor([4.7]), "model.clip.visual.proj": torch.zeros(2, 2)}
    exported = training_to_open_clip(state)
    assert exported["logit_scale"].shape == () and exported["logit_scale"].exp().item() == pytest.approx(100.0)


def test_unknown_checkpoint_paths_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a state-dict file"):
        resolve_checkpoint(tmp_path)


def test_the_cli_does_not_overwrite_or_crash_on_a_bad_output_checkpoint_or_model(tmp_path, capsys):
    (tmp_path / "fineclip.pt").write_bytes(b"an earlier export")
    for output in ("fineclip.pt", "fineclip.json", "."):  # exists / the config would replace it / a folder
        with pytest.raises(SystemExit):
            main(["--checkpoint", str(tmp_path / "fineclip.pt"), "--output", str(tmp_path / output)])
    err = capsys.readouterr().err
    assert "fineclip.pt exists; pass --overwrite to replace it" in err and err.count("expected a file path") == 2
    assert (tmp_path / "fineclip.pt").read_bytes() == b"an earlier export"
    with pytest.raises(SystemExit, match="export: --checkpoint .*missing: not a state-dict file") as usage:
        main(["--checkpoint", str(tmp_path / "missing"), "--output", str(tmp_path / "new.pt")])
    assert usage.value.code == 2 and "export: error: export: --checkpoint" in capsys.readouterr().err  # was exit 1
    with pytest.raises(SystemExit, match="export: --model ViT-B-61: not an open_clip model name"):
        main(["--checkpoint", str(tmp_path / "fineclip.pt"), "--model", "ViT-B-61", "--output", str(tmp_path / "new.pt")])
    assert not (tmp_path / "new.json").exists()


def test_an_export_that_cannot_be_written_leaves_nothing_and_a_truncated_input_is_named(tmp_path, monkeypatch):
    """A full disk left a truncated .pt (which a rerun refused to overwrite) and a traceback saying 'unexpected pos';
    a truncated input gave a raw traceback."""
    weights = tmp_path / "weights.pt"
    torch.save(open_clip.create_model("FineCLIP-ViT-T-8").state_dict(), weights)
    args = ["--checkpoint", str(weights), "--model", "FineCLIP-ViT-T-8", "--output", str(tmp_path / "out" / "f.pt")]
    save = torch.save

    def full_disk(obj, path, *rest, **kwargs):
        save(obj, path, *rest, **kwargs)  # written in part, as a full disk leaves it
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match=r"export: --output .*f.pt: cannot write the export \(.*unexpected pos 128 "
                                         r"vs 0; \d+ MiB free there\)") as failure:
        main(args)
    assert failure.value.code != 2  # not a usage error: the disk's
    assert list((tmp_path / "out").iterdir()) == []
    monkeypatch.setattr(torch, "save", save)
    main(args)  # the rerun needs no --overwrite
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["f.json", "f.pt"]
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SystemExit, match=r"export: --checkpoint .*weights.pt: cannot be read"):
        main([*args[:-1], str(tmp_path / "other.pt")])


def test_a_universal_tag_exports_its_original_and_a_tag_still_being_written_is_refused(runs, tmp_path):
    """`step_N_universal` (beside `step_N` after a resume at another world size) holds step_N's weights in a
    layout zero_to_fp32 cannot read; `step_N.tmp` / `.replaced` are a save in progress, possibly half written."""
    run = tmp_path / "run"
    shutil.copytree(runs["two_zero2"], run)
    checkpoints = run / "checkpoints"
    tag = (checkpoints / "latest").read_text().strip()
    universal = convert_to_universal(ResumePoint(checkpoints, tag), rank=0)
    _, from_run = export(run, tmp_path / "run.pt")
    _, from_universal = export(str(checkpoints / universal.tag), str(tmp_path / "universal.pt"))  # paths as str too
    expected, got = torch.load(from_run, weights_only=True), torch.load(from_universal, weights_only=True)
    assert got.keys() == expected.keys() and all(torch.equal(got[key], expected[key]) for key in expected)
    for suffix in (PARTIAL_SUFFIX, REPLACED_SUFFIX):
        in_progress = checkpoints / f"step_99999999{suffix}"  # every file present, as just before the rename
        shutil.copytree(checkpoints / tag, in_progress)
        with pytest.raises(SystemExit, match=f"export: --checkpoint .*{suffix}: a checkpoint that is still being "
                           f"written or replaced; .* latest is {tag}"):
            main(["--checkpoint", str(in_progress), "--output", str(tmp_path / "partial.pt")])
    assert not (tmp_path / "partial.pt").exists()


def _fake_run(root):
    """The layout the trainer writes, without DeepSpeed files: enough for resolve_checkpoint."""
    run = root / "run"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run / "checkpoints" / "step_00000002").mkdir()
    (run / "checkpoints" / "latest").write_text("step_00000004")
    (run / "config.json").write_text(json.dumps({"model": {"name": "FineCLIP-ViT-T-8", "image_size": [48, 80]}}))
    return run


@pytest.mark.parametrize("where,given,tag", [
    ("checkpoints", ".", "step_00000004"),                     # the checkpoints folder, from inside it
    ("checkpoints", "latest", "step_00000004"),                # its pointer file: was read as a state dict
    ("checkpoints", "step_00000002", "step_00000002"),         # a tag folder, relative to the checkpoints folder
    ("checkpoints/step_00000004", "..", "step_00000004"),      # the checkpoints folder, from a tag folder
    ("checkpoints/step_00000004", "../step_00000002", "step_00000002"),
])
def test_relative_checkpoint_paths_resolve_like_absolute_ones(tmp_path, monkeypatch, where, given, tag):
    """`cd runs/exp1/checkpoints && python -m fineclip_ds.evaluate --checkpoint step_00000002 ...` lost the run's
    config.json (Path('.').parent is '.'), so the model name had to be given and the trained size was forgotten;
    `--checkpoint .` there gave tag '' and failed with "PosixPath('.') has an empty name"."""
    run = _fake_run(tmp_path)
    monkeypatch.chdir(run / where)
    source = resolve_checkpoint(given)
    assert source.tag == tag
    assert (source.path / source.tag).resolve() == (run / "checkpoints" / tag).resolve()
    assert source.run_config is not None and source.run_config["model"]["image_size"] == [48, 80]


def test_export_of_a_fineclip_state_dict_file_loads_in_plain_open_clip(tmp_path):
    """torch.save(model.state_dict()) of a FineCLIP (keys 'clip.*'), which model.pretrained and evaluate's
    --checkpoint take, was exported as is, exit 0: neither open_clip nor fineclip_ds could load the export."""
    torch.manual_seed(0)
    model, _, _ = create_fineclip(ModelConfig(name="FineCLIP-ViT-T-8"))
    torch.save(model.state_dict(), tmp_path / "fineclip_state.pt")
    main(["--checkpoint", str(tmp_path / "fineclip_state.pt"), "--model", "FineCLIP-ViT-T-8",
          "--output", str(tmp_path / "exported.pt")])
    clip = open_clip.create_model("FineCLIP-ViT-T-8").eval()
    clip.load_state_dict(torch.load(tmp_path / "exported.pt", weights_only=True))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(images, normalize=True), model.eval().encode_image(images))


def test_export_refuses_weights_that_do_not_fit_the_model_it_names(tmp_path):
    """--model naming another architecture than the weights' was written out, exit 0, as a pair that open_clip
    cannot load ('text pos_embed width changed!'); evaluate and model.pretrained refuse the same pair."""
    torch.save(open_clip.create_model("FineCLIP-ViT-T-8").state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(SystemExit, match="FineCLIP-ViT-T-16-224"):
        main(["--checkpoint", str(tmp_path / "tiny.pt"), "--model", "FineCLIP-ViT-T-16-224",
              "--output", str(tmp_path / "exported.pt")])
    assert not (tmp_path / "exported.pt").exists()


def test_the_printed_loading_lines_load_an_eva02_export_trained_at_another_size(tmp_path, capsys):
    """open_clip builds a timm trunk at the timm model's own size: the create_model_and_transforms(pretrained=) line
    printed for every export failed on an EVA02 at 56 px."""
    model, _, _ = create_fineclip(ModelConfig(name="FineCLIP-EVA02-T-14", image_size=56))
    model_config = open_clip.get_model_config("FineCLIP-EVA02-T-14")
    model_config["vision_cfg"]["image_size"] = 56
    (tmp_path / "eva.json").write_text(json.dumps(model_config))
    torch.save(model.clip.state_dict(), tmp_path / "eva.pt")
    main(["--checkpoint", str(tmp_path / "eva.pt"), "--output", str(tmp_path / "exported.pt")])
    printed = capsys.readouterr().out.splitlines()
    loading = "\n".join(line.strip() for line in printed[printed.index(next(line for line in printed
                                                                            if "load with plain" in line)) + 1:])
    namespace = {"open_clip": open_clip, "torch": torch}
    exec(loading, namespace)
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(namespace["model"].eval().encode_image(images, normalize=True),
                                   model.eval().encode_image(images))
