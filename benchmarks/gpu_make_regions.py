"""Region-captioning throughput of make_regions with BLIP-2 OPT-2.7b's shapes on a CUDA GPU (bf16).

Run from the repository root: `python benchmarks/gpu_make_regions.py [--output BENCHMARKS.md]`.
Weights cannot be downloaded here, so the model is BLIP-2 OPT-2.7b's architecture with random
weights (fineclip_ds.data.random_captioners); every caption is forced to exactly --new_tokens tokens
so the measured speed is what the real model gives at that caption length (the random captions
themselves are mostly dropped as degenerate: speed counts regions captioned, not kept). It times the product path
(image folder -> grid proposals -> crops -> processor -> generate -> shards) per region batch size and
appends one Markdown section (device, date, command, a row per batch size, written as measured) to the
output file.
`--size tiny --output /tmp/smoke.md` checks the script on a CPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_runs import MarkdownSection, device_label, synchronize  # noqa: E402
from fineclip_ds.data.make_regions import annotator_from, run, units_from  # noqa: E402
from fineclip_ds.data.make_regions import parse_args as make_regions_args  # noqa: E402
from fineclip_ds.data.random_captioners import save_random_blip2  # noqa: E402
from fineclip_ds.data.shapes_world import ShapesWorld  # noqa: E402

COLUMNS = ("model", "region batch", "regions per image", "new tokens", "images/s", "regions captioned/s", "peak GiB")


def write_pairs(directory: Path, images: int, image_size: int) -> Path:
    directory.mkdir(parents=True)
    world = ShapesWorld(seed=0, image_size=image_size)
    captions = {}
    for index in range(images):
        sample = world.sample(index)
        sample.image.save(directory / f"{index:06d}.jpg")
        captions[f"{index:06d}.jpg"] = sample.caption
    (directory / "captions.json").write_text(json.dumps(captions))
    return directory


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="opt-2.7b", help="a fineclip_ds.data.random_captioners.BLIP2_SIZES key")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=640)
    parser.add_argument("--boxes", type=int, default=10, help="regions captioned per image")
    parser.add_argument("--new_tokens", type=int, default=20)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"))
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and args.size != "tiny":
        sys.exit("gpu_make_regions.py needs a CUDA GPU for --size opt-2.7b; use --size tiny to check it on a CPU")
    with tempfile.TemporaryDirectory(prefix="make_regions_bench_") as work:  # the 2.7b model is 7.5 GB on disk
        measure(args, Path(work), cuda)


def measure(args: argparse.Namespace, work: Path, cuda: bool) -> None:
    """Writes the Markdown section: a heading, the command, and a row per region batch size."""
    device = torch.device("cuda" if cuda else "cpu")
    images = write_pairs(work / "images", args.images, args.image_size)
    model = save_random_blip2(work / "model", args.size, dtype=torch.bfloat16 if cuda else torch.float32)
    generate = json.dumps({"min_new_tokens": args.new_tokens})
    cli = make_regions_args([
        "--images", str(images), "--captions", str(images / "captions.json"), "--captioner", str(model),
        "--prompt", "a photo of", "--max_new_tokens", str(args.new_tokens), "--generate", generate,
        "--score_threshold", "0", "--max_boxes", str(args.boxes), "--samples_per_shard", "16",
        "--output_dir", str(work / "unused")])
    annotate = annotator_from(cli, device.type)
    captioner = annotate.captioner
    units = units_from(cli)
    run(units[:1], annotate, work / "warm-up")
    section = MarkdownSection(
        args.output, f"## make_regions throughput, {device_label(device)}, {datetime.date.today().isoformat()}",
        f"`python benchmarks/gpu_make_regions.py --size {args.size} --images {args.images} --boxes {args.boxes} "
        f"--new_tokens {args.new_tokens}`; BLIP-2 {args.size} shapes, random weights, "
        f"{'bf16' if cuda else 'fp32'}, {args.image_size} px images, grid proposals, prompt 'a photo of'.", COLUMNS)
    for batch_size in args.batch_sizes:
        captioner.batch_size = batch_size
        synchronize(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        summary = run(units, annotate, work / f"out-{batch_size}")
        synchronize(device)
        elapsed = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        section.row([f"BLIP-2 {args.size}", str(batch_size), f"{summary['proposals'] / summary['images_out']:.1f}",
                     str(args.new_tokens), f"{summary['images_out'] / elapsed:.2f}",
                     f"{summary['proposals'] / elapsed:.1f}", f"{peak:.1f}"])


if __name__ == "__main__":
    main()
