"""Make region-text training data: image-text pairs -> proposals -> region captions -> webdataset shards.

    python -m fineclip_ds.data.make_regions --images coco/train2017 --coco_captions captions_train2017.json \\
        --captioner /models/blip2-opt-2.7b --proposals coco --coco_instances instances_train2017.json \\
        --output_dir data/regions

Unit i of the input becomes `regions-{i:06d}.tar` (+ its counts in `regions-{i:06d}.json`), written
under a temporary name and renamed when complete: a rerun skips finished shards and redoes partial
ones. Units are split over processes by RANK / WORLD_SIZE (torchrun or srun set them). The summary
of every finished shard's counts goes to `<output_dir>/summary.json`.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import time
from collections import Counter
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from fineclip_ds.data.captioner import Captioner, TransformersCaptioner, caption_regions
from fineclip_ds.data.pair_sources import Unit, coco_caption_units, folder_units, webdataset_units
from fineclip_ds.data.proposals import (CocoBoxProposer, DetectorProposer, GridProposer, ProposalFilter,
                                        Proposer)
from fineclip_ds.data.records import IMAGE_EXTENSIONS


def shard_name(index: int) -> str:
    return f"regions-{index:06d}"


def record_key(name: str) -> str:
    """A webdataset key from an input name: webdataset splits a member name at its first dot, so
    "000123.jpg" written as a key would turn the record's "jpg" into "jpg.jpg"; drop the image
    extension and replace the remaining dots."""
    stem, dot, extension = name.rpartition(".")
    if dot and extension.lower() in IMAGE_EXTENSIONS:
        name = stem
    return name.replace(".", "_")


def make_shard(unit: Unit, proposer: Proposer, box_filter: ProposalFilter, captioner: Captioner, prompt: str,
               target: Path) -> Counter:
    """Annotate one unit into `target` (.tar, atomically) and return its counts."""
    counts: Counter = Counter()
    partial = target.with_suffix(".tar.tmp")
    with wds.TarWriter(str(partial)) as writer:
        for pair in unit(counts):
            counts["images_in"] += 1
            if pair.image is None:
                counts["corrupt_image"] += 1
                continue
            if not pair.caption:
                counts["missing_caption"] += 1
                continue
            image = pair.image.convert("RGB")
            boxes = box_filter(proposer.propose(image, pair.key), *image.size)
            counts["proposals"] += len(boxes)
            captions, drops = caption_regions(captioner, [image.crop(tuple(round(v) for v in b)) for b in boxes], prompt)
            counts.update(drops)
            kept = [(list(box), caption) for box, caption in zip(boxes, captions) if caption is not None]
            counts["regions"] += len(kept)
            counts["images_out"] += 1
            counts["images_without_regions"] += 0 if kept else 1
            encoded = io.BytesIO()
            image.save(encoded, format="JPEG", quality=95)
            writer.write({"__key__": record_key(pair.key), "jpg": encoded.getvalue(), "txt": pair.caption,
                          "json": json.dumps({"boxes": [box for box, _ in kept],
                                              "region_captions": [caption for _, caption in kept]})})
    target.with_suffix(".json").write_text(json.dumps(counts))  # counts first: a finished .tar always has them
    os.replace(partial, target)
    return counts


def run(units: list[Unit], proposer: Proposer, box_filter: ProposalFilter, captioner: Captioner, prompt: str,
        output_dir: Path, rank: int = 0, world_size: int = 1) -> Counter:
    """Annotate this process's units that are not finished yet; returns the summary over all finished shards."""
    output_dir.mkdir(parents=True, exist_ok=True)
    mine = [index for index in range(len(units)) if index % world_size == rank]
    todo = [index for index in mine if not (output_dir / f"{shard_name(index)}.tar").is_file()]
    progress = tqdm(todo, desc=f"regions (rank {rank})", unit="shard")
    started, done = time.perf_counter(), Counter()
    for index in progress:
        done.update(make_shard(units[index], proposer, box_filter, captioner, prompt,
                               output_dir / f"{shard_name(index)}.tar"))
        elapsed = time.perf_counter() - started
        progress.set_postfix({"img/s": f"{done['images_out'] / elapsed:.1f}", "regions/s": f"{done['regions'] / elapsed:.1f}"})
    summary = Counter()
    for counts_file in sorted(output_dir.glob("regions-*.json")):
        if counts_file.with_suffix(".tar").is_file():
            summary.update(json.loads(counts_file.read_text()))
    summary["shards"] = sum(1 for _ in output_dir.glob("regions-*.tar"))
    if rank == 0:
        (output_dir / "summary.json").write_text(json.dumps(dict(summary), indent=2))
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_argument_group("input pairs (one of)")
    source.add_argument("--shards", help="webdataset shards with jpg/png + txt (brace pattern)")
    source.add_argument("--images", type=Path, help="image folder (with --captions or --coco_captions)")
    source.add_argument("--captions", type=Path, help="JSON {file: caption} or TSV file<TAB>caption")
    source.add_argument("--coco_captions", type=Path, help="COCO captions JSON")
    parser.add_argument("--samples_per_shard", type=int, default=1000)
    parser.add_argument("--proposals", choices=("grid", "coco", "detector"), default="grid")
    parser.add_argument("--coco_instances", type=Path, help="--proposals coco: instances JSON")
    parser.add_argument("--detector_weights", type=Path, help="--proposals detector: Faster R-CNN state dict")
    parser.add_argument("--min_side", type=float, default=0.05)
    parser.add_argument("--max_area", type=float, default=0.9)
    parser.add_argument("--score_threshold", type=float, default=0.5)
    parser.add_argument("--nms_iou", type=float, default=0.7)
    parser.add_argument("--max_boxes", type=int, default=10)
    parser.add_argument("--captioner", required=True, help="local path of a transformers image-to-text model")
    parser.add_argument("--prompt", default="", help="e.g. 'a photo of' for BLIP-2")
    parser.add_argument("--max_new_tokens", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--output_dir", type=Path, required=True)
    return parser.parse_args(argv)


def units_from(args: argparse.Namespace) -> list[Unit]:
    if args.shards:
        return webdataset_units(args.shards)
    if args.images and args.coco_captions:
        return coco_caption_units(args.coco_captions, args.images, args.samples_per_shard)
    if args.images and args.captions:
        return folder_units(args.images, args.captions, args.samples_per_shard)
    raise SystemExit("input: give --shards, or --images with --captions or --coco_captions")


def proposer_from(args: argparse.Namespace) -> Proposer:
    if args.proposals == "coco":
        if not args.coco_instances:
            raise SystemExit("--proposals coco needs --coco_instances")
        return CocoBoxProposer(args.coco_instances)
    if args.proposals == "detector":
        if not args.detector_weights:
            raise SystemExit("--proposals detector needs --detector_weights")
        return DetectorProposer(args.detector_weights)
    return GridProposer()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    box_filter = ProposalFilter(args.min_side, args.max_area, args.score_threshold, args.nms_iou, args.max_boxes)
    captioner = TransformersCaptioner(args.captioner, args.prompt, args.max_new_tokens, args.batch_size)
    summary = run(units_from(args), proposer_from(args), box_filter, captioner, args.prompt, args.output_dir,
                  int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    print(json.dumps(dict(summary), indent=2))


if __name__ == "__main__":
    main()
