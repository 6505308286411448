"""Build FineCLIP through open_clip by model name; our tiny configs are registered on import."""
from __future__ import annotations

import difflib
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Callable

import open_clip
import torch
import torch.nn.functional as F

from fineclip_ds.config import ConfigError, ModelConfig
from fineclip_ds.models.fineclip import FineCLIP
from fineclip_ds.sizes import height_width
from fineclip_ds.usage_errors import first_lines

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

Tokenizer = Callable[[list[str]], torch.Tensor]
log = logging.getLogger("fineclip_ds")


def patch_grid(image_size: int | tuple[int, int] | list[int], patch_size: int | tuple[int, int] | list[int]
               ) -> tuple[int, int]:
    """(rows, columns) of patches a ViT makes of an image of `image_size`."""
    (height, width), (patch_h, patch_w) = height_width(image_size), height_width(patch_size)
    return height // patch_h, width // patch_w


def _native_grid(name: str) -> tuple[int, int] | None:
    """The patch grid an open_clip ViT config (and so its checkpoints) was trained at; None for timm towers."""
    vision = open_clip.get_model_config(name).get("vision_cfg", {})
    size, patch = vision.get("image_size"), vision.get("patch_size")
    if size is None or patch is None or vision.get("timm_model_name"):
        return None
    return patch_grid(size, patch)


def resample_positional_grid(table: torch.Tensor, native: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """The positional table of a `native` patch grid resampled to `grid`, by open_clip's interpolation
    (bicubic, antialiased) but from the grid's real shape: open_clip's own resize reads every table as
    a square (sqrt of its length), so a non-square grid (an export trained at [48, 80]) came out scrambled,
    and one of a non-square length failed to load."""
    # table: [1 + H*W, C] (class token first) -> [1 + h*w, C]
    image_part = table[1:].detach().reshape(1, *native, -1).permute(0, 3, 1, 2).float()
    resampled = F.interpolate(image_part, size=grid, mode="bicubic", antialias=True, align_corners=False)
    resampled = resampled.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(table.dtype)
    return torch.cat([table[:1].detach(), resampled])


def _mapped_checkpoint(path: str) -> dict | None:
    """A torch checkpoint's top-level dict, memory-mapped (its weights are not read); None where it cannot be
    read so (an OpenAI TorchScript archive, a legacy or safetensors file, not weights)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:
        return None
    return checkpoint if isinstance(checkpoint, dict) else None


def _checkpoint_table_rows(path: str) -> int | None:
    """Rows of a checkpoint's image positional table, read without loading its weights (memory-mapped);
    None where it cannot be told cheaply (open_clip's own load then reads the file and reports any error)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as weights:
                keys = [key for key in weights.keys() if key.removeprefix("module.") == "visual.positional_embedding"]
                return weights.get_slice(keys[0]).get_shape()[0] if keys else None
        except Exception:  # not a safetensors file after all
            return None
    checkpoint = _mapped_checkpoint(path) or {}
    for key, value in checkpoint.get("state_dict", checkpoint).items():
        if str(key).removeprefix("module.") == "visual.positional_embedding" and isinstance(value, torch.Tensor):
            return value.shape[0]
    return None


def _is_torchscript_archive(path: str) -> bool:
    """OpenAI's own CLIP files (ViT-B-16.pt, ViT-L-14-336.pt, ...) are TorchScript archives."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _create_from_openai_archive(config: ModelConfig, build: Callable[..., torch.nn.Module]) -> torch.nn.Module:
    """open_clip's model with the weights of an OpenAI TorchScript archive, which open_clip's file loading
    refuses (torch.load with weights_only=True cannot read TorchScript). OpenAI trained with QuickGELU: a
    GELU model (ViT-B-16, not ViT-B-16-quickgelu) loads the same weights without error and computes other
    features, so it is refused here."""
    if not open_clip.get_model_config(config.name).get("quick_gelu", False):
        variant = f"{config.name}-quickgelu"
        expected = f"'{variant}'" if variant in open_clip.list_models() else "a model config with \"quick_gelu\": true"
        raise ConfigError(f"model.name: got '{config.name}', which uses GELU, but model.pretrained {config.pretrained} "
                          f"is an OpenAI checkpoint, trained with QuickGELU; expected {expected}")
    state_dict = torch.jit.load(config.pretrained, map_location="cpu").state_dict()
    for key in ("input_resolution", "context_length", "vocab_size"):  # attributes of OpenAI's module, not weights
        state_dict.pop(key, None)
    clip = build()
    state_dict["logit_scale"] = state_dict["logit_scale"].reshape(clip.logit_scale.shape)
    native, table = _native_grid(config.name), state_dict.get("visual.positional_embedding")
    grid = tuple(getattr(clip.visual, "grid_size", ()))
    if native is not None and table is not None and grid != native and table.shape[0] == 1 + native[0] * native[1]:
        table = table.to(clip.visual.positional_embedding.dtype)  # OpenAI's are fp16: resample at the model's
        state_dict["visual.positional_embedding"] = resample_positional_grid(table, native, grid)
    clip.load_state_dict(state_dict)
    return clip


def _build(name: str, size: int | tuple[int, int] | list[int] | None, device: torch.device | str,
           pretrained: str | None = None) -> torch.nn.Module:
    return open_clip.create_model(name, pretrained=pretrained, nonscalar_logit_scale=True, device=device,
                                  force_image_size=tuple(size) if isinstance(size, list) else size)


class _RandomInitNotice(logging.Filter):
    """open_clip's warning for a model built without pretrained=, dropped where the factory loads the weights
    itself right after: 'Model initialized randomly' was printed on every rank of a fine-tuning run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


def _built_for_weights(name: str, size: int | tuple[int, int] | list[int] | None,
                       device: torch.device | str) -> torch.nn.Module:
    """A model whose weights the caller (or, for a plan, the run) loads next: its random init draws nothing from
    the RNG and open_clip does not announce it (open_clip logs through the root logger)."""
    notice = _RandomInitNotice()
    logging.getLogger().addFilter(notice)
    try:
        with torch.random.fork_rng(devices=[]):
            return _build(name, size, device)
    finally:
        logging.getLogger().removeFilter(notice)


def _size_of(name: str, size: int | tuple[int, int] | list[int] | None) -> tuple[int, int]:
    """(height, width) of `size`; None is the model config's own."""
    return height_width(open_clip.get_model_config(name)["vision_cfg"]["image_size"] if size is None else size)


def resized_clip(clip: torch.nn.Module, name: str, image_size: int | tuple[int, int] | list[int] | None,
                 device: torch.device | str = "cpu") -> torch.nn.Module:
    """`clip`, loaded at the size its weights were trained at, built again at `image_size` (None: its model
    config's) with the same weights, its positional table resampled from its own grid, which may be
    non-square: open_clip's resize reads every table as a square, and its pretrained= loading refuses a timm
    tower's (EVA02) table of another size. A timm tower resamples its own table, in `clip` itself."""
    resized = _built_for_weights(name, image_size, device)
    if hasattr(clip.visual, "trunk"):
        clip.visual.set_input_size(resized.visual.image_size)
    state_dict = clip.state_dict()
    if "visual.positional_embedding" in state_dict:
        state_dict["visual.positional_embedding"] = resample_positional_grid(
            state_dict["visual.positional_embedding"], tuple(clip.visual.grid_size), tuple(resized.visual.grid_size))
    resized.load_state_dict(state_dict)
    return resized


def _pretrained_weights(config: ModelConfig, force_image_size: int | tuple[int, int] | None
                        ) -> tuple[dict[str, torch.Tensor], int | list[int] | None] | None:
    """`config.pretrained` as an open_clip state dict and the image size it was trained at (None: its model
    config's), for what open_clip cannot load or size by itself: a run (its output, checkpoints or tag folder,
    whose config.json names the model and the size), a state dict export wrote with its model config beside
    it, a FineCLIP state_dict() (keys 'clip.*'). None for any other file, which open_clip loads."""
    from fineclip_ds import export  # reads runs through DeepSpeed, right of models/: imported only when needed

    try:
        source = export.resolve_checkpoint(config.pretrained, field="model.pretrained")
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(str(error)) from error
    if source.tag is not None:
        trained_name = (source.run_config or {}).get("model", {}).get("name", config.name)
        if trained_name != config.name:
            raise ConfigError(f"model.name: got '{config.name}', but model.pretrained {config.pretrained} is a run "
                              f"of '{trained_name}'; expected '{trained_name}'")
    elif export.exported_model_config(source) is None:
        checkpoint = _mapped_checkpoint(config.pretrained) or {}
        if isinstance(checkpoint.get("module"), dict):
            tag = Path(config.pretrained).parent
            raise ConfigError(
                f"model.pretrained: got '{config.pretrained}', a DeepSpeed model-states file, whose weights are in "
                "the training precision, or under ZeRO-3 not in it at all (each rank's shard is in its own file); "
                f"expected the tag folder it lies in (model.pretrained={tag}), or one file made with: "
                f"python -m fineclip_ds.export --checkpoint {tag} --output fineclip.pt")
        if not export.is_fineclip_state_dict(checkpoint):
            return None
        state_dict = export.training_to_open_clip(checkpoint, prefix=export.FINECLIP_PREFIX)
        table, native = state_dict.get("visual.positional_embedding"), _native_grid(config.name)
        at_native = table is None or native is None or table.shape[0] == 1 + native[0] * native[1]
        return state_dict, None if at_native else force_image_size  # sized as an open_clip file is
    try:
        return export.open_clip_state_dict(source, lazy=True), export.trained_image_size(source)
    except (FileNotFoundError, ValueError) as error:  # a tag folder deleted since, a folder of another trainer
        raise ConfigError(f"model.pretrained {config.pretrained}: {error}") from error


def _load_one_at_a_time(clip: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """clip.load_state_dict(state_dict), strict, reading each tensor as it is copied and dropping it after, so that a
    run's lazy tensors (export.open_clip_state_dict) are never all in memory: the model and one tensor, not the model
    twice. The keys are compared first, as strict loading does, before anything is read."""
    expected = clip.state_dict().keys()
    if state_dict.keys() != expected:
        missing, unexpected = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
        raise RuntimeError(f"Error(s) in loading state_dict: missing key(s) {missing[:3]} ({len(missing)} in all), "
                           f"unexpected key(s) {unexpected[:3]} ({len(unexpected)} in all)")
    for name in list(state_dict):
        clip.load_state_dict({name: state_dict.pop(name).contiguous()}, strict=False)


def _create_clip(config: ModelConfig, force_image_size: int | tuple[int, int] | None, device: torch.device | str,
                 load_pretrained: bool = True) -> torch.nn.Module:
    """open_clip's model with `config.pretrained` loaded, at `force_image_size`.

    Weights of a known trained size (`_pretrained_weights`) load at that size, and `resized_clip` builds the
    model again at `force_image_size`. Otherwise a checkpoint whose positional table has its model config's
    length is taken to be at that config's grid (true of open_clip's and OpenAI's weights): it is loaded at
    that size and resized the same way, not by open_clip, which reads every table as a square and keeps one
    of the same length as is (8 x 8 would be read as 4 x 16). A table of the new grid's own length loads as
    is. timm towers (EVA02) resample their own table through timm's set_input_size."""
    if not load_pretrained:
        return _built_for_weights(config.name, force_image_size, device)
    if not config.pretrained:  # None, or "" as open_clip takes it
        return _build(config.name, force_image_size, device)
    if _is_torchscript_archive(config.pretrained):
        return _create_from_openai_archive(config, lambda: _built_for_weights(config.name, force_image_size, device))
    weights = _pretrained_weights(config, force_image_size)
    if weights is not None:
        state_dict, trained_size = weights
        clip = _built_for_weights(config.name, trained_size, device)
        state_dict["logit_scale"] = state_dict["logit_scale"].reshape(clip.logit_scale.shape)
        _load_one_at_a_time(clip, state_dict)
    else:
        native = _native_grid(config.name)
        if native is None or force_image_size is None:
            return _build(config.name, force_image_size, device, config.pretrained)
        grid = patch_grid(force_image_size, open_clip.get_model_config(config.name)["vision_cfg"]["patch_size"])
        if grid == native or _checkpoint_table_rows(config.pretrained) != 1 + native[0] * native[1]:
            return _build(config.name, force_image_size, device, config.pretrained)
        clip = _build(config.name, None, device, config.pretrained)
    if _size_of(config.name, clip.visual.image_size) == _size_of(config.name, force_image_size):
        return clip
    return resized_clip(clip, config.name, force_image_size, device)


def _warn_if_text_stays_random(config: ModelConfig) -> None:
    """The big recipes freeze the text tower and name no weights: unless the user sets model.pretrained, the
    image tower learns to match the captions' random encodings, and nothing else says so."""
    if config.freeze_text and not config.pretrained:
        log.warning("model.freeze_text is true but model.pretrained is not set: the text tower stays at its random "
                    "initialisation, so every caption is encoded by random weights; set model.pretrained=<open_clip "
                    "checkpoint file> (e.g. --set model.pretrained=/path/to/ViT-B-16.pt), or model.freeze_text=false "
                    "to train the text tower")


def create_fineclip(config: ModelConfig, device: torch.device | str = "cpu", load_pretrained: bool = True,
                    announce: bool = True) -> tuple[FineCLIP, Tokenizer, tuple[tuple[float, ...], tuple[float, ...]]]:
    """Return the model, its tokenizer and its (mean, std) image normalisation.

    `config.pretrained` is local (nothing is downloaded): a checkpoint file (an open_clip state dict, or OpenAI's
    TorchScript archive with a QuickGELU model name such as ViT-B-16-quickgelu), or a fineclip_ds run, which
    evaluate's --checkpoint takes too: its output folder, checkpoints folder or one tag folder.
    `device="meta"` (inside `with torch.device("meta")`) builds the structure without memory, for planning;
    `load_pretrained=False` leaves `config.pretrained` unread too: a plan of a run that will load it.
    `announce` logs what was loaded and warns of a frozen text tower left random: one rank of a run does.
    """
    known = open_clip.list_models()
    if config.name not in known:
        close = difflib.get_close_matches(config.name, known, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"model.name: got '{config.name}', expected an open_clip model name ({hint}see "
                          "open_clip.list_models())")
    size = config.image_size
    force_image_size = tuple(size) if isinstance(size, list) else size  # positional embeddings interpolated
    try:
        clip = _create_clip(config, force_image_size, device, load_pretrained)
    except (RuntimeError, AssertionError, KeyError, EOFError, pickle.UnpicklingError) as error:
        if config.pretrained is None or not load_pretrained:
            raise
        # open_clip's shape asserts and torch's state-dict errors do not say which setting is wrong
        raise ConfigError(f"model.pretrained: {config.pretrained} does not load into model.name '{config.name}' "
                          f"(another architecture, or not a checkpoint file?): {type(error).__name__}: "
                          f"{first_lines(error)}") from error
    try:
        model = FineCLIP(
            clip, freeze_text=config.freeze_text, grad_checkpointing=config.grad_checkpointing,
            checkpoint_every=config.checkpoint_every, attention=config.attention,
        )
    except ValueError as error:  # an image tower the dense path cannot use: the model config, named, no traceback
        raise ConfigError(str(error)) from error
    if any(side % patch for side, patch in zip(model.image_size, model.patch_size)):
        # the patch embedding would silently drop the remainder pixels and boxes would map off the grid
        raise ConfigError(f"model.image_size: got {list(model.image_size)}, expected multiples of {config.name}'s "
                          f"patch size {list(model.patch_size)}")
    if announce:
        _warn_if_text_stays_random(config)
    if announce and config.pretrained and load_pretrained:
        log.info("model.pretrained %s loaded into %s at %s px", config.pretrained, config.name, list(model.image_size))
    tokenizer = open_clip.get_tokenizer(config.name)
    mean = tuple(getattr(clip.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(getattr(clip.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
    return model, tokenizer, (mean, std)
