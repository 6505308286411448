"""Typed run configuration: one dataclass tree, loaded from a recipe file plus `key=value` overrides.

The DeepSpeed JSON stays the single source for ZeRO stage, precision, batch size per GPU,
gradient accumulation and clipping; everything else about a run lives here. Validation happens in
one place (`validate`) so a bad recipe fails at start with the field, the value and what was
expected, never deep inside a step.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fineclip_ds.run_layout import LATEST, folder_with_latest, folders_that_may_hold_latest
from fineclip_ds.sizes import height_width

RECIPE_DIR = Path(__file__).parent / "recipes"
BACKENDS = ("auto", "triton", "torch")
ATTENTION_BACKENDS = ("auto", "flash_attn", "sdpa", "math")


class ConfigError(ValueError):
    """A recipe or override names an unknown field or gives a value outside what it allows."""


@dataclass
class ModelConfig:
    name: str = "FineCLIP-ViT-T-8"  # an open_clip model name (ours are registered on import)
    pretrained: str | None = None  # open_clip / OpenAI checkpoint file, or a fineclip_ds run folder; None = random init
    freeze_text: bool = True  # FineCLIP trains the image tower only
    grad_checkpointing: bool = False  # recompute image blocks in backward (non-reentrant)
    checkpoint_every: int = 1  # with grad_checkpointing: every k-th block (1 = all; 2 = half the recompute)
    attention: str = "auto"  # auto | flash_attn | sdpa | math
    image_size: int | list[int] | None = None  # train/evaluate at this size (H or [H, W]); None = the model's own


@dataclass
class LossConfig:
    w_gc: float = 1.0  # global image-text contrastive
    w_sd: float = 1.0  # region self-distillation
    w_rc: float = 1.0  # regional (region-caption) contrastive
    sd_teacher_grad: bool = True  # FineCLIP's code lets gradient flow through the crop teacher
    crop_enlarge: float = 1.5  # self-distillation crops are the box enlarged by this factor
    # Teacher crops come from the image at this many times the model's input size: 1 crops the model
    # input itself (cheapest; small boxes come out blurred), FineCLIP crops the full-size original.
    crop_source_scale: int = 1


@dataclass
class KernelConfig:
    region_pool: str = "auto"  # triton | torch | auto (triton on CUDA)
    contrastive: str = "auto"


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | webdataset
    train_shards: str | None = None  # brace pattern or path of webdataset shards
    world_seed: int = 0  # seed of the built-in shapes world
    world_image_size: int = 128  # resolution the shapes world renders at
    max_boxes: int = 20
    num_workers: int = 1
    max_bad_fraction: float = 0.1  # a shard with more unusable records than this is reported by name


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio


@dataclass
class TrainConfig:
    max_steps: int = 300  # length of the run and of its learning-rate schedule
    stop_at_step: int | None = None  # end this job early (with a checkpoint), e.g. to fit a cluster time slot
    seed: int = 0
    output_dir: str = "runs/default"
    resume: str | None = None  # None | "auto" | a checkpoint directory
    save_every: int = 100
    keep_last: int = 3
    log_every: int = 10
    # skips in a row (a NaN/inf loss, or an optimizer step DeepSpeed dropped for a NaN/inf gradient) before the run stops
    max_consecutive_nonfinite: int = 5


@dataclass
class EvalConfig:
    every: int = 0  # evaluate on the built-in world's held-out split every N steps (0: never)
    images: int = 256  # held-out images per evaluation
    batch_size: int = 32


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# How a run runs, not what it trains: a resumed run may change these. data.train_shards may name the same
# files elsewhere (the data stream refuses other files itself); model.pretrained is compared, because a
# resume at another world size takes the frozen weights from it.
FREE_ON_RESUME = frozenset({
    "model.grad_checkpointing", "model.checkpoint_every", "model.attention", "kernels.region_pool",
    "kernels.contrastive", "data.train_shards", "data.num_workers", "data.max_bad_fraction", "train.stop_at_step",
    "train.output_dir", "train.resume", "train.save_every", "train.keep_last", "train.log_every",
    "train.max_consecutive_nonfinite", "eval.every", "eval.images", "eval.batch_size",
})


def changed_run_settings(saved: dict[str, Any], config: RunConfig) -> list[tuple[str, Any, Any]]:
    """(field, saved value, value now) for each field outside FREE_ON_RESUME that differs from `saved`
    (a `to_dict()` of the run's config); fields `saved` lacks (added since) are not compared, and an image
    size given as 224 equals [224, 224]."""
    now, changed = config.to_dict(), []
    for section, fields in saved.items():
        for name, before in fields.items():
            field_path = f"{section}.{name}"
            if section not in now or name not in now[section] or field_path in FREE_ON_RESUME:
                continue
            after = now[section][name]
            if field_path == "model.image_size" and None not in (before, after):
                before, after = height_width(before), height_width(after)
            if before != after:
                changed.append((field_path, saved[section][name], now[section][name]))
    return changed


def _coerce(path: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field's annotation, converting YAML ints to floats where allowed."""
    allowed = typing.get_args(annotation) or (annotation,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{path}: null is not allowed (expected {_type_names(allowed)})")
    for kind in allowed:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in (str, bool) and isinstance(value, kind):
            return value
        if typing.get_origin(kind) is list and isinstance(value, list):
            return [_coerce(f"{path}[{index}]", item, typing.get_args(kind)[0]) for index, item in enumerate(value)]
    raise ConfigError(f"{path}: {value!r} is a {type(value).__name__}, expected {_type_names(allowed)}")


def _type_names(kinds: tuple) -> str:
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def _merge(section: Any, values: dict[str, Any], prefix: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'recipe'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(type(section))
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"unknown config key '{path}' (known: {', '.join(sorted(hints))})")
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, f"{path}.")
        else:
            setattr(section, key, _coerce(path, value, hints[key]))


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader with two changes. A mapping that gives a key twice is an error (YAML requires unique
    keys; PyYAML kept the last without a word, so a second `train:` section dropped every setting of the first).
    Numbers are read as YAML 1.2 reads them, not 1.1: `010` is 10, not 8; `1:30` is text, not 90; `1e-4` is a
    float, not text."""

    yaml_implicit_resolvers = {
        first: [(tag, pattern) for tag, pattern in resolvers if tag not in (_INT, _FLOAT)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges, and keys after it override
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                twice = key in seen
            except TypeError:  # an unhashable key: the safe constructor names it
                break
            if twice:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _construct_yaml12_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    base = {"0o": 8, "0x": 16}.get(text[:2], 10)
    return int(text, base)


_YAML12_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_YAML12_FLOAT = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                           r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_UniqueKeyLoader.add_implicit_resolver(_INT, _YAML12_INT, list("-+0123456789"))
_UniqueKeyLoader.add_implicit_resolver(_FLOAT, _YAML12_FLOAT, list("-+.0123456789"))
_UniqueKeyLoader.add_constructor(_INT, _construct_yaml12_int)


class _DuplicateKeyError(ValueError):
    pass


def _unique_json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKeyError(f"key {key!r} is given twice")
        seen.add(key)
    return dict(pairs)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)


def resolve_recipe_path(recipe: str) -> Path:
    """A recipe is a file path or the name of a built-in recipe in fineclip_ds/recipes."""
    path = Path(recipe)
    if path.is_file():
        return path
    for suffix in (".yaml", ".yml", ".json"):
        candidate = RECIPE_DIR / f"{recipe}{suffix}"
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
    raise ConfigError(f"recipe '{recipe}' is neither a file nor a built-in recipe ({', '.join(known)})")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_steps=10` -> (["train", "max_steps"], 10); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({_one_line(error)})") from error
    return key.strip().split("."), value


def _wants_text(keys: list[str]) -> bool:
    """Whether the field at `keys` takes a string and no number or bool, so a value YAML reads as one
    (a date, `off`, `2024`) is meant as its text."""
    section: Any = RunConfig
    for key in keys:
        hints = typing.get_type_hints(section) if dataclasses.is_dataclass(section) else {}
        if key not in hints:
            return False  # an unknown key: _merge names it
        section = hints[key]
    allowed = set(typing.get_args(section) or (section,))
    return str in allowed and not allowed & {bool, int, float}


def _holds_comment(raw: str) -> bool:
    """Whether YAML drops part of an override's value as a comment (`runs/try #2` -> 'runs/try', `#2` -> null)."""
    try:
        node = yaml.compose(raw, Loader=_UniqueKeyLoader)
    except yaml.YAMLError:
        return False
    return raw[node.end_mark.index if node is not None else 0:].strip().startswith("#")


def override_value(value: object) -> object:
    """`value` for a `section.key=value` override: a path or text quoted, so that YAML reads it as given (no
    comment at ' #', mapping at ': ' or null in it); numbers as they are."""
    return json.dumps(str(value), ensure_ascii=False) if isinstance(value, (str, Path)) else value


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def load_config(recipe: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults <- recipe file <- overrides, then validated."""
    config = RunConfig()
    if recipe is not None:
        path = resolve_recipe_path(recipe)
        text = path.read_text()
        try:
            if path.suffix == ".json":
                values = json.loads(text, object_pairs_hook=_unique_json_object)
            else:
                values = _load_yaml(text)
        except (json.JSONDecodeError, yaml.YAMLError, _DuplicateKeyError) as error:  # a typo in the recipe, not a crash
            kind = "JSON" if path.suffix == ".json" else "YAML"
            raise ConfigError(f"recipe {path}: not valid {kind} ({_one_line(error)})") from error
        if values is None:  # an empty or comment-only file would train the bare defaults without a word
            raise ConfigError(f"recipe {path}: the file holds no settings; give a recipe's sections (model, data, "
                              f"losses, optim, train, ...) or a built-in recipe name")
        _merge(config, values, "")
    for override in overrides:
        keys, value = parse_override(override)
        raw = override.split("=", 1)[1]
        if _wants_text(keys) and (isinstance(value, (bool, int, float, datetime.date)) or _holds_comment(raw)):
            value = raw.strip()  # `train.output_dir=2024-01-01`: YAML read a date; `runs/try #2`: cut at ' #'
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        _merge(config, nested, "")
    validate(config)
    return config


def positive_int(text: str) -> int:
    """argparse type for counts (GPUs, batch sizes, images): 0 or -2 would fail later with no hint, or plan
    a world with negative memory."""
    return _int_from(text, 1, "an integer >= 1")


def non_negative_int(text: str) -> int:
    """argparse type for seeds: numpy refuses a negative one, after the model has loaded."""
    return _int_from(text, 0, "an integer >= 0")


def count_limit(text: str) -> int:
    """argparse type for an upper bound on a count, where 0 means no limit; a negative one sliced off the last items
    ([:-1]) without a word."""
    return _int_from(text, 0, "an integer >= 0 (0: no limit)")


def _int_from(text: str, low: int, expected: str) -> int:
    value = int(text)
    if value < low:
        raise argparse.ArgumentTypeError(f"got {value}, expected {expected}")
    return value


def fraction(text: str) -> float:
    """argparse type for shares and thresholds (IoU, score, a fraction of the image): float() takes "nan", which
    compares false with every box, so that every box was dropped or kept without a word."""
    return _float_within(text, 0.0, 1.0, "a number from 0 to 1")


def non_negative_float(text: str) -> float:
    """argparse type for sizes in pixels that must be finite (a lower bound: inf or nan would drop every box)."""
    return _float_within(text, 0.0, sys.float_info.max, "a finite number >= 0")


def size_limit(text: str) -> float:
    """argparse type for an upper bound in pixels, where inf means no limit."""
    return _float_within(text, 0.0, math.inf, "a number >= 0, or inf for no limit")


def _float_within(text: str, low: float, high: float, expected: str) -> float:
    value = float(text)
    if not low <= value <= high:  # NaN fails every comparison
        raise argparse.ArgumentTypeError(f"got {text}, expected {expected}")
    return value


def _require(condition: bool, field_path: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"{field_path}: got {value!r}, expected {expected}")


def validate(config: RunConfig) -> None:
    """Cross-field and range checks; each message names the field, the value and what is allowed."""
    _require(config.model.attention in ATTENTION_BACKENDS, "model.attention", config.model.attention, f"one of {ATTENTION_BACKENDS}")
    _require(config.kernels.region_pool in BACKENDS, "kernels.region_pool", config.kernels.region_pool, f"one of {BACKENDS}")
    _require(config.kernels.contrastive in BACKENDS, "kernels.contrastive", config.kernels.contrastive, f"one of {BACKENDS}")
    _require(config.data.source in ("synthetic", "webdataset"), "data.source", config.data.source, "'synthetic' or 'webdataset'")
    _require(
        config.data.source != "webdataset" or bool(config.data.train_shards),
        "data.train_shards", config.data.train_shards, "a shard path or brace pattern when data.source is 'webdataset'",
    )
    size = config.model.image_size
    sizes = [size] if isinstance(size, int) else size or []
    _require(size is None or (len(sizes) == (1 if isinstance(size, int) else 2) and all(s >= 16 for s in sizes)),
             "model.image_size", size, "null, an integer >= 16, or [height, width]")
    _require(config.model.checkpoint_every >= 1, "model.checkpoint_every", config.model.checkpoint_every, "an integer >= 1")
    _require(config.data.max_boxes >= 1, "data.max_boxes", config.data.max_boxes, "an integer >= 1")
    _require(0 <= config.data.max_bad_fraction <= 1, "data.max_bad_fraction", config.data.max_bad_fraction,
             "a fraction in [0, 1]")
    _require(config.data.num_workers >= 0, "data.num_workers", config.data.num_workers, "an integer >= 0")
    _require(config.data.world_seed >= 0, "data.world_seed", config.data.world_seed, "an integer >= 0")
    _require(config.data.world_image_size >= 16, "data.world_image_size", config.data.world_image_size, "an integer >= 16")
    for name in ("w_gc", "w_sd", "w_rc"):
        weight = getattr(config.losses, name)
        _require(0 <= weight < math.inf, f"losses.{name}", weight, "a finite weight >= 0")
    _require(
        config.losses.w_gc + config.losses.w_sd + config.losses.w_rc > 0,
        "losses", (config.losses.w_gc, config.losses.w_sd, config.losses.w_rc), "at least one positive loss weight",
    )
    _require(1.0 <= config.losses.crop_enlarge < math.inf, "losses.crop_enlarge", config.losses.crop_enlarge,
             "a finite factor >= 1.0")
    _require(isinstance(config.losses.crop_source_scale, int) and 1 <= config.losses.crop_source_scale <= 8,
             "losses.crop_source_scale", config.losses.crop_source_scale, "an integer in 1..8")
    _require(0 < config.optim.lr < math.inf, "optim.lr", config.optim.lr, "a finite learning rate > 0")
    _require(0 <= config.optim.weight_decay < math.inf, "optim.weight_decay", config.optim.weight_decay,
             "a finite value >= 0")
    for name in ("beta1", "beta2"):
        beta = getattr(config.optim, name)
        _require(0 <= beta < 1, f"optim.{name}", beta, "a value in [0, 1)")
    _require(0 < config.optim.eps < math.inf, "optim.eps", config.optim.eps, "a finite value > 0")
    _require(0 <= config.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", config.optim.min_lr_ratio, "a value in [0, 1]")
    _require(config.optim.warmup_steps >= 0, "optim.warmup_steps", config.optim.warmup_steps, "an integer >= 0")
    _require(config.train.max_steps >= 1, "train.max_steps", config.train.max_steps, "an integer >= 1")
    _require(0 <= config.train.seed < 2**32, "train.seed", config.train.seed, "an integer in [0, 2**32)")
    stop = config.train.stop_at_step
    _require(stop is None or 1 <= stop <= config.train.max_steps, "train.stop_at_step", stop, "null or 1..train.max_steps")
    _require(config.train.save_every >= 1, "train.save_every", config.train.save_every, "an integer >= 1")
    _require(config.train.keep_last >= 1, "train.keep_last", config.train.keep_last, "an integer >= 1")
    _require(config.train.log_every >= 1, "train.log_every", config.train.log_every, "an integer >= 1")
    _require(config.train.max_consecutive_nonfinite >= 1, "train.max_consecutive_nonfinite",
             config.train.max_consecutive_nonfinite, "an integer >= 1")
    _require(config.eval.every >= 0, "eval.every", config.eval.every, "an integer >= 0 (0 disables)")
    _require(config.eval.images >= 1, "eval.images", config.eval.images, "an integer >= 1")
    _require(config.eval.batch_size >= 1, "eval.batch_size", config.eval.batch_size, "an integer >= 1")
    # `--output_dir "$RUN"` with RUN unset: the run's checkpoints/, logs and summary went into the working folder
    _require(bool(config.train.output_dir.strip()), "train.output_dir", config.train.output_dir, "a folder path")
    resume = config.train.resume
    _require(
        resume is None or resume == "auto" or Path(resume).is_dir(),
        "train.resume", resume, "null, 'auto' or an existing checkpoint directory",
    )
    pretrained = config.model.pretrained
    expected = ("null, an existing checkpoint file, or a fineclip_ds run: its output folder, checkpoints folder or "
                "one tag folder")
    if pretrained is not None and Path(pretrained).is_dir():
        checkpoints, output, parent = folders_that_may_hold_latest(Path(pretrained))
        _require(folder_with_latest(Path(pretrained)) is not None, "model.pretrained", pretrained,
                 f"{expected} (no '{LATEST}' file in {checkpoints}, {output} or {parent}: has the run saved a "
                 "checkpoint yet?)")
    else:
        _require(pretrained is None or Path(pretrained).is_file(), "model.pretrained", pretrained, expected)
