import json
import re

import open_clip
import pytest
import torch

from fineclip_ds.config import RECIPE_DIR, ConfigError, ModelConfig, load_config


def test_recipe_then_overrides_take_precedence():
    config = load_config("tiny-cpu", ["train.max_steps=7", "losses.w_sd=0", "optim.lr=2"])
    assert config.train.max_steps == 7 and config.losses.w_sd == 0.0 and config.optim.lr == 2.0
    assert config.model.name == "FineCLIP-ViT-T-8"


def test_exponent_floats_without_a_dot_are_floats():
    # YAML 1.1 reads `1e-4` as a string; a learning rate written that way must still work
    assert load_config("tiny-cpu", ["optim.lr=1e-4"]).optim.lr == 1e-4


@pytest.mark.parametrize("written, steps", [("010", 10), ("0o10", 8), ("0x10", 16), ("+12", 12)])
def test_numbers_are_read_as_yaml_1_2_reads_them(tmp_path, written, steps):
    """YAML 1.1 (PyYAML) read `010` as octal 8 and `1:30` as 90, in an override and in a recipe alike."""
    assert load_config("tiny-cpu", [f"train.max_steps={written}"]).train.max_steps == steps
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"train:\n  max_steps: {written}\n")
    assert load_config(str(recipe)).train.max_steps == steps


@pytest.mark.parametrize("override", ["train.max_steps=1:30", "train.max_steps=1_000", "optim.lr=1:30.5"])
def test_yaml_1_1_sexagesimal_and_underscored_numbers_are_refused_not_converted(override):
    with pytest.raises(ConfigError, match="is a str, expected"):
        load_config("tiny-cpu", [override])


@pytest.mark.parametrize("override,message", [
    ("train.max_stepz=3", "unknown config key 'train.max_stepz'"),
    ("model.colour=red", "unknown config key 'model.colour'"),
    ("optim.lr=fast", "optim.lr: 'fast' is a str, expected float"),
    ("train.max_steps=0", "train.max_steps: got 0, expected an integer >= 1"),
    ("kernels.region_pool=cuda", "kernels.region_pool: got 'cuda', expected one of"),
    ("data.source=laion", "data.source: got 'laion'"),
    ("data.source=webdataset", "data.train_shards"),
    ("losses.w_gc=-1", "losses.w_gc: got -1.0"),
    # an infinite weight made every step's loss non-finite: the run stopped at max_consecutive_nonfinite
    ("losses.w_rc=.inf", "losses.w_rc: got inf, expected a finite weight >= 0"),
    # an infinite enlargement crops the whole image for every box (and NaN for a box of zero width)
    ("losses.crop_enlarge=.inf", "losses.crop_enlarge: got inf, expected a finite factor >= 1.0"),
    ("optim.lr=.inf", "optim.lr: got inf, expected a finite learning rate > 0"),
    ("optim.beta2=1.5", "optim.beta2: got 1.5, expected a value in [0, 1)"),
    ("optim.eps=-1", "optim.eps: got -1.0"),
    ("train.seed=-1", "train.seed: got -1"),
    ("losses.crop_source_scale=0", "losses.crop_source_scale: got 0, expected an integer in 1..8"),
    ("model.image_size=[72]", "model.image_size: got [72], expected null, an integer >= 16, or [height, width]"),
    ("train.resume=/no/such/dir", "train.resume"),
    ("model.pretrained=/no/such/file.pt", "model.pretrained"),
    ("nonsense", "must look like section.key=value"),
    ("model.image_size=[64,64", "override 'model.image_size=[64,64': the value is not valid YAML"),
    ("data.world_seed=-1", "data.world_seed: got -1, expected an integer >= 0"),
    # `--output_dir "$RUN"` with RUN unset trained in the working folder
    ('train.output_dir=""', "train.output_dir: got '', expected a folder path"),
    ("train.output_dir=' '", "train.output_dir: got ' ', expected a folder path"),
])
def test_bad_values_are_rejected_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("tiny-cpu", [override])


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ConfigError, match="tiny-cpu"):
        load_config("no-such-recipe")


def test_all_built_in_recipes_load():
    recipes = sorted(path.stem for path in RECIPE_DIR.glob("*.yaml"))
    assert {"tiny-cpu", "vit-b-16", "vit-l-14", "vit-l-14-336", "vit-h-14", "vit-g-14", "vit-bigg-14"} <= set(recipes)
    for name in recipes:
        load_config(name)


@pytest.mark.parametrize("file_name,text,message", [
    ("tab.yaml", "model:\n  name: ViT-B-16\n\tfreeze_text: true\n", "not valid YAML"),
    ("broken.json", '{"model": {', "not valid JSON (Expecting property name"),
    # both trained the bare defaults (lr 1e-5, a frozen random text tower) without a word
    ("empty.yaml", "", "the file holds no settings"),
    # a key given twice: the last won without a word, the second `train:` dropping the first's max_steps
    ("twice.yaml", "train:\n  max_steps: 50\noptim:\n  lr: 1.0e-3\ntrain:\n  save_every: 10\n",
     "not valid YAML (key 'train' is given twice"),
    ("twice_nested.yaml", "optim:\n  lr: 1.0e-3\n  lr: 0.5\n", "not valid YAML (key 'lr' is given twice"),
    ("twice.json", '{"optim": {"lr": 0.001, "lr": 0.5}}', "not valid JSON (key 'lr' is given twice"),
    ("comments.yaml", "# model:\n#   name: ViT-B-16\n", "the file holds no settings"),
])
def test_a_recipe_file_that_does_not_parse_names_the_file(tmp_path, file_name, text, message):
    (tmp_path / file_name).write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"recipe {tmp_path / file_name}: {message}")):
        load_config(str(tmp_path / file_name))


def test_model_settings_open_clip_cannot_build_are_config_errors(tmp_path):
    from fineclip_ds.models.factory import create_fineclip

    with pytest.raises(ConfigError, match=r"model.name: got 'ViT-B-61', expected an open_clip model name "
                                          r"\(did you mean ViT-B-16"):
        create_fineclip(ModelConfig(name="ViT-B-61"), device="meta")
    # 65 px with 8 px patches: the patch embedding would drop a pixel row and column without a word
    with pytest.raises(ConfigError, match=re.escape("model.image_size: got [64, 65], expected multiples of "
                                                    "FineCLIP-ViT-T-8's patch size [8, 8]")):
        create_fineclip(ModelConfig(image_size=[64, 65]), device="meta")
    torch.save(open_clip.create_model("FineCLIP-ViT-T-16-224").state_dict(), tmp_path / "other.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    for weights in ("other.pt", "notes.pt"):
        with pytest.raises(ConfigError, match=f"model.pretrained: {tmp_path / weights} does not load into "
                                              "model.name 'FineCLIP-ViT-T-8'"):
            create_fineclip(ModelConfig(pretrained=str(tmp_path / weights)))


@pytest.mark.parametrize("settings,message", [
    ([1, 2], "holds a list, expected a JSON object"),
    ({"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu is 0, expected an integer >= 1"),
    ({"train_micro_batch_size_per_gpu": "32"}, "train_micro_batch_size_per_gpu is '32', expected an integer >= 1"),
    ({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 0}, "gradient_accumulation_steps is 0"),
    ({"train_micro_batch_size_per_gpu": 8, "bf16": {"enabled": True}, "fp16": {"enabled": True}},
     "bf16 and fp16 are both enabled, expected at most one"),
    # sections the trainer reads before DeepSpeed: each raised an AttributeError naming no key
    ({"train_micro_batch_size_per_gpu": 8, "bf16": True}, "bf16 is true, expected a JSON object"),
    ({"train_micro_batch_size_per_gpu": 8, "zero_optimization": None}, "zero_optimization is null, expected a JSON"),
    ({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2, "offload_optimizer": None}},
     "zero_optimization.offload_optimizer is null, expected a JSON object"),
    ({"train_micro_batch_size_per_gpu": 8, "fp16": {"enabled": "yes"}}, 'fp16.enabled is "yes", expected true or'),
    ({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": True}}, "zero_optimization.stage is True"),
    # HF Trainer's placeholder: DeepSpeed used gradient_clipping "auto" as given, a TypeError at the first step
    ({"train_micro_batch_size_per_gpu": 8, "gradient_clipping": "auto"}, "gradient_clipping: 'auto' is a placeholder"),
    ({"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto"},
     "train_batch_size, train_micro_batch_size_per_gpu: 'auto' is a placeholder HF Trainer fills in"),
    # DeepSpeed's old name for bf16, which it still reads: the trainer's precision checks read only "bf16", so
    # check_grad_overflow false there at ZeRO-2 was let through (NaN gradients applied)
    ({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2},
      "bfloat16": {"enabled": True, "check_grad_overflow": False}}, "'bfloat16' is DeepSpeed's old name for 'bf16'"),
])
def test_deepspeed_json_values_deepspeed_would_assert_on_are_refused(tmp_path, settings, message):
    from fineclip_ds.training.parallelize import DeepSpeedConfigError, load_deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(settings))
    with pytest.raises(DeepSpeedConfigError, match=re.escape(message)):
        load_deepspeed_config(path)


@pytest.mark.parametrize("section", [
    {"optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.2}}},
    {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_max_lr": 3e-4, "total_num_steps": 1000}}},
], ids=["optimizer", "scheduler"])
def test_deepspeed_json_optimizer_and_scheduler_sections_are_refused_not_ignored(tmp_path, section):
    """The trainer hands DeepSpeed its own AdamW and schedule (from optim.*), and DeepSpeed then drops a
    JSON optimizer/scheduler without a word: the run would train at the recipe's lr, not the JSON's."""
    from fineclip_ds.training.parallelize import DeepSpeedConfigError, load_deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, **section}))
    key = next(iter(section))
    with pytest.raises(DeepSpeedConfigError, match=re.escape(f"the '{key}' section would be ignored")) as error:
        load_deepspeed_config(path)
    assert "optim.lr" in str(error.value) and str(path) in str(error.value)


@pytest.mark.parametrize("offload", [None, {"device": "none"}, {"device": "cpu"},
                                     {"device": "nvme", "nvme_path": "/local_nvme"}])
def test_the_optimizer_runs_on_the_cpu_wherever_deepspeed_offloads_it(offload):
    """With offload_optimizer on NVMe DeepSpeed steps on the CPU too and refuses any optimizer but its CPU Adam
    (ZeRORuntimeException once the model is built); NVMe offload was given torch's AdamW."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    from fineclip_ds.training.parallelize import offloads_optimizer

    zero = {"stage": 3, **({} if offload is None else {"offload_optimizer": offload})}
    deepspeed_offload = DeepSpeedZeroConfig(**zero).offload_optimizer
    steps_on_cpu = deepspeed_offload is not None and deepspeed_offload.device in (OffloadDeviceEnum.cpu,
                                                                                   OffloadDeviceEnum.nvme)
    assert offloads_optimizer({"zero_optimization": zero}) == steps_on_cpu


def test_resume_from_something_that_is_not_a_checkpoint_is_a_config_error(tmp_path):
    from fineclip_ds.training.checkpoint import find_resume_point

    with pytest.raises(ConfigError, match="train.resume .*expected 'auto', a checkpoints folder with a 'latest' file"):
        find_resume_point(str(tmp_path), tmp_path / "run" / "checkpoints")


def test_resume_from_another_models_checkpoint_names_a_differing_parameter(tmp_path):
    """DeepSpeed saves every parameter's shape beside the weights (format as written by DeepSpeed 0.19)."""
    from fineclip_ds.models.factory import create_fineclip
    from fineclip_ds.training.checkpoint import ResumePoint, check_same_model

    def save_shapes(model_config: ModelConfig) -> None:
        model, _, _ = create_fineclip(model_config, device="meta")
        shapes = {name: parameter.shape for name, parameter in model.named_parameters()}
        (tmp_path / "step_00000002").mkdir(exist_ok=True)
        torch.save({"param_shapes": [shapes], "frozen_param_shapes": None},
                   tmp_path / "step_00000002" / "mp_rank_00_model_states.pt")

    point = ResumePoint(tmp_path, "step_00000002")
    model, _, _ = create_fineclip(ModelConfig(image_size=32), device="meta")
    save_shapes(ModelConfig(image_size=32))
    check_same_model(point, model)
    save_shapes(ModelConfig())
    with pytest.raises(ConfigError, match=re.escape("1 parameters differ, e.g. clip.visual.positional_embedding: "
                                                    "(65, 64) there, (17, 64) here")):
        check_same_model(point, model)


def test_a_run_given_as_pretrained_is_accepted_and_a_folder_without_a_checkpoint_says_why(tmp_path):
    """Fine-tuning from an earlier run: its output, checkpoints or tag folder, found by its 'latest' file."""
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(ConfigError, match=re.escape(
            f"model.pretrained: got '{run}', expected null, an existing checkpoint file, or a fineclip_ds run: its "
            f"output folder, checkpoints folder or one tag folder (no 'latest' file in {run / 'checkpoints'}, {run} "
            f"or {tmp_path}: has the run saved a checkpoint yet?)")):
        load_config("tiny-cpu", [f"model.pretrained={run}"])
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000002")
    for folder in (run, run / "checkpoints", run / "checkpoints" / "step_00000002"):
        assert load_config("tiny-cpu", [f"model.pretrained={folder}"]).model.pretrained == str(folder)


@pytest.mark.parametrize("override,field,expected", [
    ("train.output_dir=2024-01-01", ("train", "output_dir"), "2024-01-01"),  # YAML: a date
    ("train.output_dir=2024", ("train", "output_dir"), "2024"),  # YAML: an int
    ("model.name=off", ("model", "name"), "off"),  # YAML 1.1: a bool
    # YAML: a comment. `--set train.output_dir=ablations/try #2` trained in (and resumed from) 'ablations/try'
    ("train.output_dir=ablations/try #2", ("train", "output_dir"), "ablations/try #2"),
    ("train.output_dir=#2", ("train", "output_dir"), "#2"),  # YAML: null, the recipe's folder dropped
])
def test_a_text_setting_keeps_the_text_yaml_would_read_as_another_type(override, field, expected):
    config = load_config("tiny-cpu", [override])
    assert getattr(getattr(config, field[0]), field[1]) == expected
