"""Make region-text training data: image-text pairs -> proposals -> region captions -> webdataset shards.

    python -m fineclip_ds.data.make_regions --images coco/train2017 --coco_captions captions_train2017.json \\
        --captioner /models/blip2-opt-2.7b --proposals coco --coco_instances instances_train2017.json \\
        --output_dir data/regions

With --fineclip_proposals and --fineclip_region_captions instead of --captioner, FineCLIP's released
files are converted into the same shards. A box's caption is the one keyed
"{file_name}_{x}_{y}_{w}_{h}.jpg": the file name as the proposals JSON gives it, and its COCO bbox
truncated to integers ([10.7, 4.2, 20.5, 30.0] -> "000000000139.jpg_10_4_20_30.jpg").

Unit i of the input becomes `regions-{i:06d}.tar` (+ its counts in `regions-{i:06d}.json`), written
under a temporary name and renamed when complete: a rerun skips finished shards and redoes partial
ones. A unit whose input could not be read in full (a truncated or vanished input shard) keeps its
counts but no .tar, so a rerun retries it; the summary counts it under unreadable_input_shards. An input
shard truncated for good is finished from the records before the break by a rerun with --keep_readable_part
(counted under partly_read_input_shards), once a read of it has broken before. Units
are split over processes by RANK / WORLD_SIZE (torchrun) or SLURM_PROCID / SLURM_NTASKS (srun), one
GPU each. Each process, when done, sums the counts of every finished shard into
`<output_dir>/summary.json`: the last one to finish writes the complete summary.

The options that decide what the shards hold (all but --batch_size, --images_per_call, --keep_readable_part
and --output_dir)
are recorded in `<output_dir>/settings.json`; a rerun into a folder holding finished shards made with
other settings stops (exit 2) rather than mix old shards with new ones, as does one finding that file
unreadable (cut short, or edited into something other than a JSON object).
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from tqdm import tqdm

from fineclip_ds.config import count_limit, fraction, non_negative_float, positive_int, size_limit
from fineclip_ds.data.captioner import TransformersCaptioner
from fineclip_ds.data.images import to_rgb
from fineclip_ds.data.pair_sources import Pair, Unit, coco_caption_units, folder_units, webdataset_units
from fineclip_ds.data.proposals import (CocoBoxProposer, DetectorMismatch, DetectorProposer, GridProposer,
                                        ProposalFilter, Proposer)
from fineclip_ds.data.records import encode_record, record_key
from fineclip_ds.data.region_annotators import CaptionedProposals, RegionAnnotator, ReleasedRegionCaptions
from fineclip_ds.data.streams import expand_shard_urls, is_local, missing_local_shards
from fineclip_ds.files import write_atomically
from fineclip_ds.usage_errors import UsageError, report_usage_errors

log = logging.getLogger("fineclip_ds")


# Images annotated together: their region crops (~10 each) fill the captioner's generate batches.
IMAGES_PER_CALL = 32

SETTINGS_FILE = "settings.json"
# Options that change how fast the shards are made, not what they hold: a rerun may change them.
RUN_ONLY_OPTIONS = ("batch_size", "images_per_call", "keep_readable_part", "output_dir")


def shard_name(index: int) -> str:
    return f"regions-{index:06d}"


class Progress:
    """One bar per process over images, with images/s, regions/s and shards done."""

    def __init__(self, rank: int, shards: int):
        self.bar = tqdm(desc=f"regions (rank {rank})", unit="img")
        self.started, self.regions, self.shards, self.shards_total = time.perf_counter(), 0, 0, shards

    def images(self, count: int, regions: int) -> None:
        self.regions += regions
        self.bar.update(count)
        self._show_rates()

    def shard_done(self) -> None:
        """Updates the postfix too: the last shard's images came before it was done, and no images() after."""
        self.shards += 1
        self._show_rates()

    def _show_rates(self) -> None:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix({"regions/s": f"{self.regions / elapsed:.1f}",
                              "shards": f"{self.shards}/{self.shards_total}"}, refresh=False)


def annotate_pairs(pairs: list[Pair], annotate: RegionAnnotator, counts: Counter, taken_keys: set[str]) -> list[dict]:
    """Input pairs -> training-format records of the usable ones, annotated together; the rest counted.

    `taken_keys` (record keys already written to this shard) is extended with the new records' keys."""
    usable: list[tuple[Pair, str]] = []  # with its record key
    for pair in pairs:
        counts["images_in"] += 1
        key = record_key(pair.key)
        if pair.image is None:
            counts["corrupt_image"] += 1
        elif not pair.caption:
            counts["missing_caption"] += 1
        elif key in taken_keys:  # "a.b.jpg" and "a_b.jpg" share the key "a_b"
            counts["duplicate_key"] += 1
        else:
            taken_keys.add(key)
            usable.append((pair, key))
    images = [to_rgb(pair.image) for pair, _ in usable]
    all_regions = annotate(images, [pair.key for pair, _ in usable], counts) if usable else []
    records = []
    for (pair, key), image, regions in zip(usable, images, all_regions):
        counts["regions"] += len(regions)
        counts["images_out"] += 1
        counts["images_without_regions"] += 0 if regions else 1
        records.append(encode_record(key, image, pair.caption, [box for box, _ in regions],
                                     [caption for _, caption in regions], quality=95))
    return records


def make_shard(unit: Unit, annotate: RegionAnnotator, target: Path, progress: Progress | None = None,
               images_per_call: int = IMAGES_PER_CALL, keep_readable_part: bool = False) -> Counter:
    """Annotate one unit into `target` (.tar, atomically), `images_per_call` images at a time; returns its counts.

    A unit whose input broke off is finished only with `keep_readable_part`, and only when an earlier attempt
    broke too: a read that failed once (a network mount's hiccup) is retried, not finished half-empty."""
    counts_file = target.with_suffix(".json")
    broke_before = _earlier_counts(counts_file).get("corrupt_shard", 0) > 0
    counts: Counter = Counter()
    partial = target.with_suffix(".tar.tmp")
    taken_keys: set[str] = set()
    pairs = unit(counts)
    with wds.TarWriter(str(partial)) as writer:
        while chunk := list(itertools.islice(pairs, images_per_call)):
            regions_before = counts["regions"]
            for record in annotate_pairs(chunk, annotate, counts, taken_keys):
                writer.write(record)
            if progress:
                progress.images(len(chunk), counts["regions"] - regions_before)
    write_atomically(counts_file, json.dumps(counts))  # counts first: a finished .tar always has them
    if counts["corrupt_shard"] and not (keep_readable_part and broke_before):  # unfinished: a rerun retries it
        partial.unlink()
        log.warning("%s: its input could not be read in full (see above); not marked finished, a rerun retries it. "
                    "If that input stays truncated, a rerun with --keep_readable_part keeps the %d images read "
                    "before the break", target.name, counts["images_out"])
    else:
        os.replace(partial, target)
    return counts


def _earlier_counts(counts_file: Path) -> dict:
    """The counts an earlier attempt at a shard left; none when there was none or its file is unreadable (written
    in place by versions before 2026-11-26, a crash could leave it empty: every rerun then stopped on it)."""
    try:
        return json.loads(counts_file.read_text())
    except (OSError, ValueError):
        return {}


def summarize(output_dir: Path) -> Counter:
    """The counts of every finished shard (those finished from a truncated input counted as partly read), plus
    the shards left unfinished because their input was unreadable."""
    summary = Counter()
    for counts_file in sorted(output_dir.glob("regions-*.json")):
        counts = json.loads(counts_file.read_text())
        if counts_file.with_suffix(".tar").is_file():
            summary.update(counts)
            if counts.get("corrupt_shard"):
                summary["partly_read_input_shards"] += 1
        elif counts.get("corrupt_shard"):
            summary["unreadable_input_shards"] += 1
            summary["corrupt_shard"] += counts["corrupt_shard"]
    summary["shards"] = sum(1 for _ in output_dir.glob("regions-*.tar"))
    return summary


def run(units: list[Unit], annotate: RegionAnnotator, output_dir: Path, rank: int = 0, world_size: int = 1,
        images_per_call: int = IMAGES_PER_CALL, keep_readable_part: bool = False) -> Counter:
    """Annotate this process's units that are not finished yet; returns the summary over all finished shards."""
    output_dir.mkdir(parents=True, exist_ok=True)
    mine = [index for index in range(len(units)) if index % world_size == rank]
    todo = [index for index in mine if not (output_dir / f"{shard_name(index)}.tar").is_file()]
    if len(todo) < len(mine):
        print(f"regions (rank {rank}): {len(mine) - len(todo)} of {len(mine)} output shards already finished in "
              f"{output_dir}, skipped; {len(todo)} to make", file=sys.stderr, flush=True)
    progress = Progress(rank, len(todo))
    for index in todo:
        make_shard(units[index], annotate, output_dir / f"{shard_name(index)}.tar", progress, images_per_call,
                   keep_readable_part)
        progress.shard_done()
    progress.bar.close()
    summary = summarize(output_dir)
    write_atomically(output_dir / "summary.json", json.dumps(dict(summary), indent=2), writer=rank)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_argument_group("input pairs (one of)")
    source.add_argument("--shards", help="webdataset shards with jpg/png + txt (brace pattern)")
    source.add_argument("--images", type=Path, help="image folder (with --captions or --coco_captions)")
    source.add_argument("--captions", type=Path, help="JSON {file: caption} or TSV file<TAB>caption")
    source.add_argument("--coco_captions", type=Path, help="COCO captions JSON")
    parser.add_argument("--samples_per_shard", type=positive_int, default=1000)
    regions = parser.add_argument_group("regions: proposals captioned by a VLM")
    regions.add_argument("--proposals", choices=("grid", "coco", "detector"), default="grid")
    regions.add_argument("--coco_instances", type=Path, help="--proposals coco: instances JSON")
    regions.add_argument("--detector_weights", type=Path, help="--proposals detector: torchvision state dict")
    regions.add_argument("--detector_arch", default="fasterrcnn_resnet50_fpn",
                         help="torchvision detection model name (fasterrcnn_*, retinanet_*)")
    regions.add_argument("--detector_classes", type=positive_int, default=91, help="classes of the detector's head")
    regions.add_argument("--min_side", type=fraction, default=0.05, help="fraction of the image's shorter side")
    regions.add_argument("--max_area", type=fraction, default=0.9, help="fraction of the image's area")
    regions.add_argument("--score_threshold", type=fraction, default=0.5)
    regions.add_argument("--nms_iou", type=fraction, default=0.7)
    regions.add_argument("--max_boxes", type=count_limit, default=10, help="boxes kept per image (0: every box)")
    regions.add_argument("--captioner", help="local path of a transformers image-to-text model (BLIP-2, BLIP, ...)")
    regions.add_argument("--prompt", default="", help="e.g. 'a photo of' for BLIP-2")
    regions.add_argument("--max_new_tokens", type=positive_int, default=20)
    regions.add_argument("--batch_size", type=positive_int, default=32, help="region crops per generate call")
    regions.add_argument("--images_per_call", type=positive_int, default=IMAGES_PER_CALL,
                         help="images whose crops are captioned together (split into --batch_size generate calls)")
    regions.add_argument("--generate", type=generate_settings, default={},
                         help='extra generate() arguments as JSON, e.g. \'{"num_beams": 3, "repetition_penalty": 1.5}\'')
    released = parser.add_argument_group("regions: FineCLIP's released files instead of a VLM "
                                         "(with --images and --coco_captions)")
    released.add_argument("--fineclip_proposals", type=Path, help="COCO-format proposals JSON")
    released.add_argument("--fineclip_region_captions", type=Path,
                          help='JSON {"{file_name}_{x}_{y}_{w}_{h}.jpg": caption}: file_name as in '
                               "--fineclip_proposals, x y w h its COCO bbox truncated to integers (10.7 -> 10), "
                               'e.g. "000000000139.jpg_10_4_20_30.jpg"')
    released.add_argument("--min_box_size", type=non_negative_float, default=0.0, help="keep boxes with w*h >= this^2")
    released.add_argument("--max_box_size", type=size_limit, default=float("inf"), help="keep boxes with w*h <= this^2")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--keep_readable_part", action="store_true",
                        help="finish an output shard from the records read before its input shard broke off, "
                             "instead of leaving it for a rerun (for inputs truncated for good)")
    args = parser.parse_args(argv)
    if args.min_box_size > args.max_box_size:  # every box dropped, counted as box_filtered with no hint why
        parser.error(f"--min_box_size {args.min_box_size} is above --max_box_size {args.max_box_size}")
    if bool(args.fineclip_proposals) != bool(args.fineclip_region_captions):
        parser.error("--fineclip_proposals and --fineclip_region_captions go together")
    if not args.fineclip_proposals and not args.captioner:
        parser.error("give --captioner (a local transformers model), or FineCLIP's released files")
    for name in ("images", "captions", "coco_captions", "coco_instances", "detector_weights", "captioner",
                 "fineclip_proposals", "fineclip_region_captions"):
        value = getattr(args, name)
        if value and not Path(value).exists():
            parser.error(f"--{name} {value}: no such file or directory (local paths only; nothing is downloaded)")
    named = expand_shard_urls(args.shards) if args.shards else []
    if missing := missing_local_shards(named):
        shown = ", ".join(str(Path(shard).absolute()) for shard in missing[:5]) + (", ..." if len(missing) > 5 else "")
        parser.error(f"--shards {args.shards}: {len(missing)} of its {len(named)} files do not exist: {shown}")
    if conflict := settings_conflict(args.output_dir, output_settings(args)):
        parser.error(conflict)
    if args.captioner and not Path(args.captioner).is_dir():
        parser.error(f"--captioner {args.captioner}: expected the folder of a transformers model")
    # checked here, not when the proposer is built: that comes after the captioner's (long) load
    if not args.fineclip_proposals and args.proposals == "coco" and not args.coco_instances:
        parser.error("--proposals coco needs --coco_instances")
    if not args.fineclip_proposals and args.proposals == "detector" and not args.detector_weights:
        parser.error("--proposals detector needs --detector_weights")
    if unknown := unknown_generate_settings(args.generate):
        parser.error(f"--generate: {unknown}; expected a JSON object of generate() settings (transformers' "
                     "GenerationConfig fields, e.g. num_beams)")
    return args


def generate_settings(text: str) -> Any:
    """argparse type for --generate: JSON whose numbers are finite. json.loads takes NaN, Infinity and 1e999 (as
    inf), which JSON has not, and they went on to generate()."""
    try:
        return json.loads(text, parse_constant=_refuse_number, parse_float=_finite_float)
    except ValueError as error:  # JSONDecodeError, or a number refused
        problem = f"not JSON ({error})" if isinstance(error, json.JSONDecodeError) else str(error)
        raise argparse.ArgumentTypeError(f"got {text}: {problem}; expected a JSON object of generate() settings "
                                         "with finite numbers, e.g. '{\"num_beams\": 3}'") from error


def _refuse_number(text: str) -> float:
    raise ValueError(f"{text} is not a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        _refuse_number(text)
    return value


def unknown_generate_settings(generate: object) -> str:
    """What is wrong with --generate, or ''. Checked before the captioner loads: transformers refuses an unknown
    key only at the first generate() call, with a shard already open."""
    if not isinstance(generate, dict):
        return f"got {type(generate).__name__} {generate!r:.100}"
    from transformers import GenerationConfig

    defaults = GenerationConfig()
    unknown = sorted(key for key in generate if not hasattr(defaults, key))
    return f"unknown settings {unknown}" if unknown else ""


def output_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The options that decide what the shards hold, as JSON values; paths absolute, so that a rerun
    from another folder compares equal."""
    def comparable(name: str, value: Any) -> Any:
        if isinstance(value, Path) or (name == "captioner" and value and is_local(value)):
            return os.path.abspath(value)
        if name == "shards" and value:  # each of a '::'-separated list
            return "::".join(os.path.abspath(part) if is_local(part) else part for part in value.split("::"))
        return value

    settings = {name: comparable(name, value) for name, value in sorted(vars(args).items())
                if name not in RUN_ONLY_OPTIONS}
    return _finite_json(json.loads(json.dumps(settings)))


def _finite_json(value: Any) -> Any:
    """`value` with each non-finite float as the text float() reads back ("inf", "-inf", "nan"). JSON has no
    Infinity or NaN, which Python writes by default and jq or JavaScript refuse; --max_box_size is inf unless
    given, and a settings.json written before the float options and --generate refused NaN may hold one. As text,
    NaN compares equal to itself."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_json(item) for item in value]
    return value


def settings_conflict(output_dir: Path, settings: dict[str, Any]) -> str | None:
    """Why a run may not write into `output_dir`: its finished shards were made with other settings, and
    would be skipped and mixed with the new ones, or the file recording them is unreadable, so that cannot be told.
    Options the recorded file lacks are not compared."""
    recorded_file = output_dir / SETTINGS_FILE
    if not recorded_file.is_file() or not any(output_dir.glob("regions-*.tar")):
        return None
    try:
        recorded = _recorded_settings(recorded_file)
    except ValueError as error:
        return (f"--output_dir {output_dir} holds finished shards, but {recorded_file}, which records the settings "
                f"they were made with, {error}, so this run cannot be checked against them; restore that file, or "
                "pick a new --output_dir, or delete the old one to remake its shards")
    differing = [name for name in sorted(recorded.keys() & settings.keys()) if recorded[name] != settings[name]]
    if not differing:
        return None
    changes = "; ".join(f"--{name}: {json.dumps(recorded[name])} in {recorded_file}, {json.dumps(settings[name])} now"
                        for name in differing)
    return (f"--output_dir {output_dir} holds shards made with other settings ({changes}); pick a new "
            "--output_dir, or delete the old one to remake its shards")


def _recorded_settings(recorded_file: Path) -> dict[str, Any]:
    """The settings an earlier run recorded; ValueError saying what is wrong with a file cut short (a full disk)
    or edited by hand, which ended in a JSONDecodeError traceback."""
    try:
        recorded = json.loads(recorded_file.read_text())  # Python reads the Infinity older runs wrote
    except (OSError, ValueError) as error:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"cannot be read as JSON ({error})") from error
    if not isinstance(recorded, dict):
        raise ValueError(f"holds {json.dumps(recorded)[:80]}, not a JSON object of settings")
    return _finite_json(recorded)


def record_settings(output_dir: Path, settings: dict[str, Any], rank: int) -> None:
    """Written at the start (the same by every process) for a later rerun to be compared with; each process
    through its own temporary file (named by rank: process ids repeat across nodes)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(output_dir / SETTINGS_FILE, json.dumps(settings, indent=2, allow_nan=False), writer=rank)


def units_from(args: argparse.Namespace) -> list[Unit]:
    if args.shards:
        return webdataset_units(args.shards)
    if not (args.images and (args.coco_captions or args.captions)):
        raise UsageError("input: give --shards, or --images with --captions or --coco_captions")
    option, path = ("--coco_captions", args.coco_captions) if args.coco_captions else ("--captions", args.captions)
    try:
        if args.coco_captions:
            return coco_caption_units(args.coco_captions, args.images, args.samples_per_shard)
        return folder_units(args.images, args.captions, args.samples_per_shard)
    except ValueError as error:  # a file of another shape, or cut short (JSONDecodeError): its message, no stack
        raise UsageError(f"{option} {path}: {error}") from error


def proposer_from(args: argparse.Namespace, device: str = "cpu") -> Proposer:
    if args.proposals == "coco":
        return CocoBoxProposer(args.coco_instances)
    if args.proposals == "detector":
        try:
            return DetectorProposer(args.detector_weights, args.detector_arch, args.detector_classes, device)
        except DetectorMismatch as error:
            raise UsageError(f"--detector_weights {args.detector_weights} does not load into --detector_arch "
                             f"{args.detector_arch} with --detector_classes {args.detector_classes}: {error}") from error
        except (ValueError, TypeError) as error:  # torchvision: an unknown name, or a model that is no detector
            raise UsageError(f"--detector_arch {args.detector_arch}: not a torchvision detector (e.g. "
                             f"fasterrcnn_resnet50_fpn, retinanet_resnet50_fpn): {error}") from error
    return GridProposer()


def process_slot(environ: dict[str, str] | None = None) -> tuple[int, int, str]:
    """(rank, world size, device) from torchrun's or Slurm's variables: each process takes its own GPU."""
    environ = os.environ if environ is None else environ
    rank = int(environ.get("RANK", environ.get("SLURM_PROCID", "0")))
    world_size = int(environ.get("WORLD_SIZE", environ.get("SLURM_NTASKS", "1")))
    local_rank = int(environ.get("LOCAL_RANK", environ.get("SLURM_LOCALID", "0")))
    device = f"cuda:{local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    return rank, world_size, device


def annotator_from(args: argparse.Namespace, device: str = "cpu") -> RegionAnnotator:
    if args.fineclip_proposals:
        return ReleasedRegionCaptions(args.fineclip_proposals, args.fineclip_region_captions, args.min_box_size,
                                      args.max_box_size, args.max_boxes)
    box_filter = ProposalFilter(args.min_side, args.max_area, args.score_threshold, args.nms_iou, args.max_boxes)
    try:
        captioner = TransformersCaptioner(args.captioner, args.prompt, args.max_new_tokens, args.batch_size,
                                          device, args.generate)
    except (OSError, ValueError) as error:  # transformers' own message, without its stack
        raise UsageError(f"--captioner {args.captioner}: not a transformers image-to-text model ({error})") from error
    return CaptionedProposals(proposer_from(args, device), box_filter, captioner, args.prompt)


def main(argv: list[str] | None = None) -> dict[str, int]:
    args = parse_args(argv)
    rank, world_size, device = process_slot()
    with report_usage_errors("make_regions"):
        units, annotate = units_from(args), annotator_from(args, device)
    record_settings(args.output_dir, output_settings(args), rank)  # once the inputs load: a failed start records nothing
    summary = run(units, annotate, args.output_dir, rank, world_size, args.images_per_call, args.keep_readable_part)
    if isinstance(annotate, ReleasedRegionCaptions):  # a run shorter than KEY_CHECK_IMAGES is checked here
        annotate.warn_if_no_key_matched()
    print(json.dumps(dict(summary), indent=2))
    return dict(summary)


if __name__ == "__main__":
    main()
