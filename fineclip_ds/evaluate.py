"""Evaluate a trained model: zero-shot box classification, retrieval, zero-shot segmentation, dense-feature
pictures, or the built-in world's held-out split.

    python -m fineclip_ds.evaluate --checkpoint runs/tiny-cpu --task box-cls \\
        --annotations instances_val2017.json --images val2017/ --output box_cls.json

`--checkpoint` is a run folder, its checkpoints folder, one tag folder (ZeRO-2 or ZeRO-3), or an
open_clip state-dict file (then `--model` names the open_clip architecture).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from fineclip_ds.config import DataConfig, ModelConfig, non_negative_float, non_negative_int, positive_int
from fineclip_ds.data.shapes_world import ShapesWorld
from fineclip_ds.evaluation.box_classification import BoxDataset, evaluate_box_classification, load_coco_boxes
from fineclip_ds.evaluation.dense_viz import write_dense_pictures
from fineclip_ds.evaluation.retrieval import RESIZE_MODES, CaptionFile, evaluate_retrieval, load_caption_file
from fineclip_ds.evaluation.segmentation import LabelledImage, evaluate_segmentation, load_label_folder
from fineclip_ds.evaluation.world import evaluate_on_world
from fineclip_ds.evaluation.zero_shot import TEMPLATE_SETS
from fineclip_ds.export import model_name_of, resolve_checkpoint, trained_image_size
from fineclip_ds.files import write_atomically
from fineclip_ds.models.factory import Tokenizer, create_fineclip
from fineclip_ds.models.fineclip import FineCLIP
from fineclip_ds.usage_errors import UsageError, report_usage_errors

TASKS = ("box-cls", "retrieval", "segmentation", "dense-viz", "world")
DEFAULT_WORLD_SEED, DEFAULT_WORLD_IMAGE_SIZE = DataConfig().world_seed, DataConfig().world_image_size
TASK_INPUTS = {"box-cls": ("annotations", "images"), "retrieval": ("annotations", "images"),
               "segmentation": ("images", "labels", "classes"), "dense-viz": ("images",), "world": ()}
FOLDER_INPUTS = ("images", "labels")
# with TASK_INPUTS, what else decides a task's numbers: its results record both beside the weights, model, size
# and dtype
TASK_OPTIONS = {"box-cls": ("templates", "keep_crowd", "min_box_size", "no_crop_baseline"),
                "retrieval": ("split", "retrieval_resize"), "segmentation": ("templates", "slide", "reduce_zero_label"),
                "dense-viz": ("max_images",), "world": ("max_images", "no_crop_baseline")}
# read by the world task too, and recorded in its results as the values it resolved (from the run when not given)
WORLD_OPTIONS = ("world_seed", "world_image_size")
DENSE_VIZ_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
Annotations = BoxDataset | CaptionFile | tuple[list[str], list[LabelledImage]] | list[Path] | None


def load_for_evaluation(checkpoint: str | Path, model_name: str | None = None, device: torch.device | str = "cpu",
                        image_size: int | list[int] | None = None) -> tuple[FineCLIP, Tokenizer, tuple]:
    """Any checkpoint form -> the FineCLIP model in eval mode, loaded as model.pretrained is for training.

    Without `image_size`, a model trained at another size than its config's (model.image_size in the run's
    config.json, or vision_cfg.image_size in the model config export writes beside its .pt) is evaluated at
    the size it was trained at, as training's own evaluation saw it; at another `image_size` its positional
    table is resampled from the trained grid (`factory.resized_clip`)."""
    source = resolve_checkpoint(checkpoint)
    name = model_name_of(source, model_name)
    size = image_size if image_size is not None else trained_image_size(source)
    model, tokenizer, normalization = create_fineclip(ModelConfig(name=name, pretrained=str(checkpoint),
                                                                  image_size=size))
    return model.to(device).eval(), tokenizer, normalization


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: this machine has no CUDA GPU")
    dtype = torch.bfloat16 if device.type == "cuda" and not args.fp32 else torch.float32
    size = args.image_size[0] if args.image_size and len(args.image_size) == 1 else args.image_size
    _check_inputs(args)
    annotations = _read_annotations(args)
    source = resolve_checkpoint(args.checkpoint)
    # the tag `latest` names now, loaded and recorded as such: a run still training moves `latest` on
    weights = source.path if source.tag is None else source.path / source.tag
    model, tokenizer, normalization = load_for_evaluation(weights, args.model, device, size)
    evaluated = {"weights": str(weights), "model": model_name_of(source, args.model),
                 "image_size": list(model.image_size), "dtype": str(dtype).removeprefix("torch."),
                 "settings": {name: str(value) if isinstance(value, Path) else value
                              for name, value in vars(args).items()
                              if name in TASK_INPUTS[args.task] + TASK_OPTIONS[args.task]}}
    return {**evaluated, **_evaluate_task(args, annotations, model, tokenizer, normalization, device, dtype,
                                          source.run_config)}


def _evaluate_task(args: argparse.Namespace, annotations: Annotations, model: FineCLIP, tokenizer: Tokenizer,
                   normalization: tuple, device: torch.device, dtype: torch.dtype, run_config: dict | None) -> dict:
    if args.task == "box-cls":
        return evaluate_box_classification(model, tokenizer, normalization, annotations, args.templates,
                                           args.batch_size, not args.no_crop_baseline, device, dtype)
    if args.task == "retrieval":
        results = evaluate_retrieval(model, tokenizer, normalization, annotations.images, args.batch_size, device,
                                     dtype, resize=args.retrieval_resize)
        return {**results, **annotations.counts()}
    if args.task == "segmentation":
        class_names, items = annotations
        return evaluate_segmentation(model, tokenizer, normalization, class_names, items, args.templates, args.slide,
                                     device, dtype, reduce_zero_label=args.reduce_zero_label)
    if args.task == "dense-viz":
        output_dir = args.output.parent / "dense_viz" if args.output else args.images.parent / "dense_viz"
        written, unreadable = write_dense_pictures(model, normalization, annotations, output_dir, device)
        return {"pictures": [str(path) for path in written], "skipped_unreadable_image": unreadable}
    seed, world_size = _held_out_world(args, run_config)
    results = evaluate_on_world(model, tokenizer, normalization, ShapesWorld(seed=seed, image_size=world_size),
                                args.max_images, args.batch_size, device, crop_baseline=not args.no_crop_baseline,
                                dtype=dtype, progress=True)
    return {"world_seed": seed, "world_image_size": world_size, **results}


def _held_out_world(args: argparse.Namespace, run_config: dict | None) -> tuple[int, int]:
    """(seed, image size) of the shapes world: as given, else the run's own (data.world_seed and
    data.world_image_size of its config.json), else the defaults. A run trained on another world was
    scored on the default one's pictures without a word, unlike its eval/* during training."""
    data = (run_config or {}).get("data", {})
    seed = args.world_seed if args.world_seed is not None else data.get("world_seed", DEFAULT_WORLD_SEED)
    size = (args.world_image_size if args.world_image_size is not None
            else data.get("world_image_size", DEFAULT_WORLD_IMAGE_SIZE))
    return seed, size


def _read_annotations(args: argparse.Namespace) -> Annotations:
    """The task's annotation files, parsed before the model loads so that a wrong file is named in seconds
    (the images stay unopened until evaluation)."""
    if args.task == "box-cls":
        return load_coco_boxes(args.annotations, args.images, args.keep_crowd, args.min_box_size)
    if args.task == "retrieval":
        return load_caption_file(args.annotations, args.images, args.split)
    if args.task == "segmentation":
        class_names, items = load_label_folder(args.images, args.labels, args.classes)
        return class_names, _some_images(items, args.images)
    if args.task == "dense-viz":
        paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in DENSE_VIZ_SUFFIXES)
        return _some_images(paths, args.images)[:args.max_images]
    return None


def _some_images(items: list, folder: Path) -> list:
    """`items`, refused when empty: an empty folder gave an empty result (dense-viz) or a bare 'no pixel scored'
    after the model had loaded (segmentation)."""
    if not items:
        raise UsageError(f"--images {folder}: no images in {folder}")
    return items


def _check_inputs(args: argparse.Namespace) -> None:
    """Before the model loads (minutes for a large checkpoint): the task's inputs are given and exist."""
    for name in TASK_INPUTS[args.task]:
        value = getattr(args, name)
        if value is None:
            raise UsageError(f"--task {args.task} needs --{name}")
        if not value.exists():
            raise UsageError(f"--{name} {value}: does not exist")
        if name in FOLDER_INPUTS and not value.is_dir():
            raise UsageError(f"--{name} {value}: expected a folder")
        if name not in FOLDER_INPUTS and not value.is_file():
            raise UsageError(f"--{name} {value}: expected a file")


def _read_by(task: str) -> tuple[str, ...]:
    """The task-specific arguments `task` reads."""
    return TASK_INPUTS[task] + TASK_OPTIONS[task] + (WORLD_OPTIONS if task == "world" else ())


def _refuse_unread_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """An option the chosen task does not read is refused, not ignored: --task world scored with its own
    'shapes' templates whatever --templates said, and --slide did nothing outside segmentation."""
    for name in sorted({name for task in TASKS for name in _read_by(task)} - set(_read_by(args.task))):
        if getattr(args, name) != parser.get_default(name):
            readers = " / ".join(task for task in TASKS if name in _read_by(task))
            parser.error(f"--{name} does not apply to --task {args.task} (--task {readers} reads it)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--model", default=None, help="open_clip model name (default: from the run's config.json)")
    parser.add_argument("--annotations", type=Path, help="COCO instances/panoptic JSON (box-cls) or caption JSON (retrieval)")
    parser.add_argument("--images", type=Path, help="image folder")
    parser.add_argument("--labels", type=Path, help="segmentation: folder of label PNGs named like the images")
    parser.add_argument("--classes", type=Path, help="segmentation: text file, one class name per line")
    parser.add_argument("--keep_crowd", action="store_true", help="box-cls: score iscrowd boxes too (FineCLIP does)")
    parser.add_argument("--min_box_size", type=non_negative_float, default=0.0,
                        help="box-cls: skip boxes with w * h < this squared (FineCLIP: 8)")
    parser.add_argument("--slide", action="store_true", help="segmentation: sliding model-sized windows")
    parser.add_argument("--reduce_zero_label", action="store_true",
                        help="segmentation: label PNGs store class k as k + 1 and 0 as unscored 'other' (ADE20K, "
                        "Pascal Context 59)")
    parser.add_argument("--image_size", type=positive_int, nargs="+", default=None,
                        help="evaluate at this size (H or H W); positional embeddings are interpolated")
    parser.add_argument("--templates", default="vild", choices=sorted(TEMPLATE_SETS))
    parser.add_argument("--split", default="test", help="Karpathy split for retrieval")
    parser.add_argument("--retrieval_resize", default="center_crop", choices=RESIZE_MODES,
                        help="retrieval: open_clip's centre crop (the published protocol) or the whole image squashed")
    parser.add_argument("--batch_size", type=positive_int, default=32)
    parser.add_argument("--max_images", type=positive_int, default=256, help="dense-viz and world tasks")
    parser.add_argument("--world_seed", type=non_negative_int, default=None,
                        help=f"world task (default: the run's data.world_seed, else {DEFAULT_WORLD_SEED})")
    parser.add_argument("--world_image_size", type=positive_int, default=None,
                        help=f"world task (default: the run's data.world_image_size, else {DEFAULT_WORLD_IMAGE_SIZE})")
    parser.add_argument("--no_crop_baseline", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast on GPU")
    parser.add_argument("--output", type=Path, default=None, help="results JSON (default: eval_<task>.json here)")
    args = parser.parse_args(argv)
    if args.image_size and len(args.image_size) > 2:
        parser.error(f"--image_size: got {len(args.image_size)} numbers, expected H or H W")
    _refuse_unread_options(parser, args)
    return args


def _results_path(args: argparse.Namespace) -> Path:
    """The results JSON, checked (and its folder made) before the evaluation, whose results it would lose."""
    output = args.output or Path(f"eval_{args.task}.json")
    if output.is_dir():
        raise UsageError(f"--output {output}: is a folder, expected the path of the results JSON")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--output {output}: cannot make its folder ({error})") from error
    return output


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    with report_usage_errors("evaluate"):
        output = _results_path(args)
        try:
            results = {"task": args.task, "checkpoint": str(args.checkpoint), **run(args)}
        except (FileNotFoundError, ValueError) as error:  # a bad --checkpoint / --model: say so, no traceback
            raise UsageError(f"evaluate: {error}") from error
    text = json.dumps(results, indent=2)
    print(text)  # first: a results file that cannot be written (disk full, read-only) keeps them on the console
    try:
        write_atomically(output, text)
    except OSError as error:
        raise SystemExit(f"--output {output}: cannot write the results ({error}); they are printed above") from error


if __name__ == "__main__":
    main()
