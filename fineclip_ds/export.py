"""Training checkpoints (ZeRO-2 or ZeRO-3) -> one open_clip state dict, and back into a model.

    python -m fineclip_ds.export --checkpoint runs/tiny-cpu --output fineclip.pt

writes `fineclip.pt` (loadable by `open_clip.create_model_and_transforms(name, pretrained=...)`) and
`fineclip.json`, the open_clip model config (with the image size the run trained at), so that names
open_clip does not ship (our tiny configs) can be registered with `open_clip.add_model_config`; a
model trained at another size loads with `force_image_size=` that size.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from fineclip_ds.files import UNREADABLE_TORCH_FILE, free_space
from fineclip_ds.models.fineclip import LOGIT_SCALE_MAX
from fineclip_ds.run_layout import LATEST, folder_with_latest
from fineclip_ds.training.checkpoint import PARTIAL_SUFFIX, REPLACED_SUFFIX, UNIVERSAL_SUFFIX
from fineclip_ds.usage_errors import UsageError, report_usage_errors

TRAINING_PREFIX = "model.clip."  # FineCLIPObjective.model (FineCLIP).clip (open_clip CLIP)
FINECLIP_PREFIX = "clip."  # FineCLIP.clip


@dataclass
class CheckpointSource:
    """Where a run's weights are: a DeepSpeed tag folder, or an open_clip state-dict file."""
    path: Path
    tag: str | None  # DeepSpeed tag (None: `path` is a state-dict file)
    run_config: dict | None  # the run's config.json when it can be found


def resolve_checkpoint(checkpoint: str | Path, field: str = "--checkpoint") -> CheckpointSource:
    """Accept a run's output folder, its checkpoints folder, one tag folder, or a state-dict file; errors
    name `field`, the setting that gave `checkpoint`.

    A tag folder that a save is still writing (`step_N.tmp`) or replacing (`step_N.replaced`) is refused:
    its files may be half written. A universal folder (`step_N_universal`, converted from `step_N` for a
    resume at another world size) holds the same weights as `step_N` beside it, which is read instead
    (zero_to_fp32 cannot read the universal layout)."""
    path = Path(checkpoint)
    if path.name == LATEST and path.is_file():  # the pointer file itself: its checkpoints folder is meant
        path = path.parent
    if path.is_file():
        return CheckpointSource(path, None, None)
    # absolute and normalised: '.' or 'step_N' given from inside a checkpoints folder has parent '.' and name ''
    path = Path(os.path.abspath(path))
    folder = folder_with_latest(path)
    if folder is None:
        raise FileNotFoundError(f"{field} {checkpoint}: not a state-dict file, a run folder, a checkpoints "
                                f"folder with '{LATEST}', or a tag folder inside one")
    latest = (folder / LATEST).read_text().strip()
    tag = path.name if folder == path.parent else latest
    if tag.endswith((PARTIAL_SUFFIX, REPLACED_SUFFIX)):
        raise ValueError(f"{field} {checkpoint}: a checkpoint that is still being written or replaced; "
                         f"take a complete one (the run folder's latest is {latest})")
    if tag.endswith(UNIVERSAL_SUFFIX):
        tag = tag[:-len(UNIVERSAL_SUFFIX)]
        if not (folder / tag).is_dir():
            raise FileNotFoundError(f"{field} {checkpoint}: a universal checkpoint is exported from the "
                                    f"tag it was converted from, and {folder / tag} is missing")
    if not (folder / tag).is_dir():  # a tag folder that is not there, beside a `latest` naming another
        raise FileNotFoundError(f"{field} {checkpoint}: no such checkpoint (the run folder's latest is {latest})")
    config_file = folder.parent / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else None
    return CheckpointSource(folder, tag, config)


def is_fineclip_state_dict(state: dict) -> bool:
    """A FineCLIP module's state_dict() (keys 'clip.*'), which model.pretrained and --checkpoint take as a file."""
    return bool(state) and all(str(key).startswith(FINECLIP_PREFIX) for key in state)


def training_to_open_clip(state: dict[str, torch.Tensor], prefix: str = TRAINING_PREFIX) -> dict[str, torch.Tensor]:
    """Strip the trainer's module prefix (or FineCLIP's own, 'clip.'); the logit scale goes back to open_clip's
    default scalar, capped at ln(100) as training used it (the stored value may sit just above: see
    CappedTemperature)."""
    clip_state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    if not clip_state:
        raise ValueError(f"no '{prefix}*' parameters in the checkpoint: not a fineclip_ds training checkpoint")
    clip_state["logit_scale"] = clip_state["logit_scale"].contiguous().reshape(()).clamp(max=LOGIT_SCALE_MAX)
    return clip_state


def open_clip_state_dict(source: CheckpointSource, lazy: bool = False) -> dict[str, torch.Tensor]:
    """The weights under open_clip's names. `lazy`: a ZeRO-3 run's trained ones stay zero_to_fp32's lazy tensors, each
    gathered from the shards at its `.contiguous()`, for a loader that reads them one at a time
    (factory._load_one_at_a_time): every rank builds its model from a run given as model.pretrained, and gathering
    them all held the weights twice. Frozen ones, and a ZeRO-2 run's (views of one concatenation of its shards), are
    read at once either way."""
    if source.tag is None:
        state = torch.load(source.path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        if state and all(str(key).startswith("module.") for key in state):  # as open_clip's own loader strips it
            state = {key[len("module."):]: value for key, value in state.items()}
        if is_fineclip_state_dict(state):
            state = training_to_open_clip(state, prefix=FINECLIP_PREFIX)
        return state
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return training_to_open_clip(get_fp32_state_dict_from_zero_checkpoint(str(source.path), tag=source.tag,
                                                                          lazy_mode=lazy))


def model_name_of(source: CheckpointSource, model_name: str | None) -> str:
    """--model, else the run's config.json, else the open_clip model config export wrote beside a state
    dict (registered with open_clip under the file's stem, as the README tells a plain open_clip user)."""
    if model_name:
        return model_name
    if source.run_config:
        return source.run_config["model"]["name"]
    if exported_model_config(source) is not None:
        model_config = source.path.with_suffix(".json")
        open_clip.add_model_config(model_config)
        return model_config.stem
    raise ValueError(f"--model is needed (model_name= from Python): {source.path} has no run config.json, nor an "
                     "open_clip model config beside it, to read the model name from")


def exported_model_config(source: CheckpointSource) -> dict | None:
    """The open_clip model config export writes beside a state dict (<name>.json), or None."""
    path = source.path.with_suffix(".json")
    if source.tag is not None or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path}: the model config beside the state dict is not valid JSON ({error})") from error
    return config if isinstance(config, dict) and {"embed_dim", "vision_cfg", "text_cfg"} <= config.keys() else None


def trained_image_size(source: CheckpointSource) -> int | list[int] | None:
    """The image size the weights were trained at: model.image_size in the run's config.json, or
    vision_cfg.image_size in the model config export wrote beside a state dict; None where neither says."""
    if source.tag is None:
        config = exported_model_config(source)
        return config["vision_cfg"].get("image_size") if config else None
    return (source.run_config or {}).get("model", {}).get("image_size")


def export(checkpoint: str | Path, output: str | Path, model_name: str | None = None) -> tuple[str, Path]:
    """Write the state dict and its open_clip model config; returns (model name, state-dict path)."""
    import fineclip_ds.models.factory  # noqa: F401  registers our model configs with open_clip

    output = Path(output)
    source = resolve_checkpoint(checkpoint)
    name = model_name_of(source, model_name)
    model_config = open_clip.get_model_config(name)
    if model_config is None:
        raise ValueError(f"--model {name}: not an open_clip model name (see open_clip.list_models())")
    try:
        state_dict = open_clip_state_dict(source)
    except UNREADABLE_TORCH_FILE as error:
        raise ValueError(f"--checkpoint {source.path}: cannot be read ({error})") from error
    trained_size = trained_image_size(source)
    if trained_size is not None:  # trained at another size: the positional embeddings are for that grid
        model_config["vision_cfg"]["image_size"] = trained_size
    _check_fits(state_dict, name, trained_size, checkpoint)
    _write_pair(output, state_dict, model_config)
    return name, output


def _check_fits(state_dict: dict[str, torch.Tensor], name: str, size: int | list[int] | None,
               checkpoint: str | Path) -> None:
    """The weights fit open_clip's `name` at `size` (keys and shapes, built on the meta device): a --model naming
    another architecture wrote a pair that neither open_clip nor fineclip_ds could load."""
    with torch.device("meta"):
        expected = open_clip.create_model(name, force_image_size=tuple(size) if isinstance(size, list) else size,
                                          pretrained=None, device="meta").state_dict()
    missing, unexpected = sorted(expected.keys() - state_dict.keys()), sorted(state_dict.keys() - expected.keys())
    wrong = [key for key in expected.keys() & state_dict.keys()
             if state_dict[key].numel() != expected[key].numel()]
    if missing or unexpected or wrong:
        raise ValueError(f"--checkpoint {checkpoint} does not fit --model {name}: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, other shapes {sorted(wrong)[:3]} ({len(missing)}, {len(unexpected)}, "
                         f"{len(wrong)} in all)")


def _write_pair(output: Path, state_dict: dict[str, torch.Tensor], model_config: dict) -> None:
    """The state dict and its model config, each written beside its place and renamed into it: a full or
    read-only disk left a truncated .pt, which a rerun then refused to overwrite."""
    config_path = output.with_suffix(".json")
    partial_weights, partial_config = (path.with_name(path.name + ".tmp") for path in (output, config_path))
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        # detached, as a module's state_dict() gives: zero_to_fp32's tensors come with requires_grad=True
        torch.save({name: tensor.detach() for name, tensor in state_dict.items()}, partial_weights)
        partial_config.write_text(json.dumps(model_config, indent=2))
        os.replace(partial_weights, output)
        os.replace(partial_config, config_path)
    except (OSError, RuntimeError) as error:  # torch.save on a full disk raises RuntimeError('unexpected pos ...')
        for partial in (partial_weights, partial_config):
            partial.unlink(missing_ok=True)
        raise OSError(f"--output {output}: cannot write the export ({error}; {free_space(output.parent)})") from error


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="run folder, checkpoints folder, tag folder or state dict")
    parser.add_argument("--output", type=Path, required=True, help="where to write the open_clip state dict (.pt)")
    parser.add_argument("--model", default=None, help="open_clip model name (default: from the run's config.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export")
    args = parser.parse_args(argv)
    if args.output.suffix == ".json" or args.output.is_dir():  # a .json would be overwritten by the model config
        parser.error(f"--output {args.output}: expected a file path for the state dict, e.g. fineclip.pt")
    taken = [path for path in (args.output, args.output.with_suffix(".json")) if path.exists()]
    if taken and not args.overwrite:
        parser.error(f"--output {args.output}: {taken[0]} exists; pass --overwrite to replace it")
    with report_usage_errors("export"):
        try:
            name, path = export(args.checkpoint, args.output, args.model)
        except (FileNotFoundError, ValueError) as error:  # a bad --checkpoint / --model: a usage error, exit 2
            raise UsageError(f"export: {error}") from error
        except OSError as error:  # a disk that is full or read-only: exit 1, no traceback
            raise SystemExit(f"export: {error}") from error
    config = path.with_suffix(".json")
    vision = json.loads(config.read_text())["vision_cfg"]
    if "timm_model_name" in vision:  # open_clip builds a timm trunk at its own size, then pretrained= fails to load
        load = (f"  model = open_clip.create_model('{config.stem}', force_image_size={vision.get('image_size')!r})\n"
                f"  model.load_state_dict(torch.load('{path}'))")
    else:
        load = f"  open_clip.create_model_and_transforms('{config.stem}', pretrained='{path}')"
    print(f"wrote {path} ({name}) and its model config {config}; load with plain open_clip:\n"
          f"  open_clip.add_model_config('{config}')\n{load}")


if __name__ == "__main__":
    main()
