"""Training speed at 224, 448 and 640 px (FineCLIP-ViT-T-16-224, positional embeddings interpolated).

    python benchmarks/resolution_speed.py --steps 8 --micro_batch 8

One process; samples/s over the whole run (the first step includes warm-up: use enough steps). Prints a table
with the device and date (Markdown), for README.md / BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import tempfile
from pathlib import Path

from fineclip_ds.config import load_config
from fineclip_ds.training.engine import train
from fineclip_ds.training.metrics import device_name
from fineclip_ds.training.process_group import exit_without_finalization


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--micro_batch", type=int, default=8)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448, 640])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        ds_config = Path(scratch) / "ds.json"
        base = json.loads(Path("ds_configs/zero2.json").read_text())
        base["train_micro_batch_size_per_gpu"] = args.micro_batch
        ds_config.write_text(json.dumps(base))
        for size in args.sizes:
            output_dir = Path(scratch) / f"size{size}"
            config = load_config("tiny-cpu", [
                "model.name=FineCLIP-ViT-T-16-224", f"model.image_size={size}", f"data.world_image_size={size}",
                f"train.max_steps={args.steps + 1}", f"train.output_dir={output_dir}", f"train.save_every={args.steps + 1}",
                f"train.log_every={args.steps + 1}", "data.num_workers=1",
            ])
            train(config, str(ds_config))
            summary = json.loads((output_dir / "summary.json").read_text())
            rows.append((size, summary))
    print(f"\nFineCLIP-ViT-T-16-224, micro-batch {args.micro_batch}, 1 process, {device_name()}, "
          f"{datetime.date.today().isoformat()}\n")
    print("| image size | tokens | samples/s | step time (s) | peak memory (MB) |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for size, summary in rows:
        print(f"| {size} | {(size // 16) ** 2} | {summary['samples_per_s']:.1f} | {summary['step_time_s']:.2f} | "
              f"{summary['peak_memory_mb']:.0f} |")


if __name__ == "__main__":
    main()
    exit_without_finalization(0)  # gloo's threads may abort a finalizing interpreter
