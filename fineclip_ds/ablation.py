"""The paper's loss ablation on the built-in world: same tiny model, seed and steps under L_GC,
L_GC+L_SD, L_GC+L_RC and all three; each evaluated on held-out regions and captions.

    python -m fineclip_ds.ablation --steps 200 --seed 0 --output_dir runs/ablation

writes `<output_dir>/ablation.json` (one record per loss set) and `<output_dir>/ablation.md` (the table).
Each run lives in `<output_dir>/<loss set>/` and resumes if interrupted.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from fineclip_ds.config import ConfigError, load_config
from fineclip_ds.data.shapes_world import ShapesWorld
from fineclip_ds.evaluate import load_for_evaluation
from fineclip_ds.evaluation.world import evaluate_on_world
from fineclip_ds.training.engine import train
from fineclip_ds.training.parallelize import DeepSpeedConfigError
from fineclip_ds.training.process_group import exit_without_finalization

LOSS_SETS: dict[str, dict[str, float]] = {
    "L_GC": {"w_gc": 1.0, "w_sd": 0.0, "w_rc": 0.0},
    "L_GC+L_SD": {"w_gc": 1.0, "w_sd": 1.0, "w_rc": 0.0},
    "L_GC+L_RC": {"w_gc": 1.0, "w_sd": 0.0, "w_rc": 1.0},
    "L_GC+L_SD+L_RC": {"w_gc": 1.0, "w_sd": 1.0, "w_rc": 1.0},
}
# the repository's ds_configs/, found from any working folder (an installed wheel has none: pass --deepspeed_config)
DEFAULT_DEEPSPEED_CONFIG = Path(__file__).resolve().parents[1] / "ds_configs" / "zero2.json"
TABLE_COLUMNS = (("box_top1", "box top-1"), ("box_top5", "box top-5"), ("crop_top1", "crop top-1"),
                 ("seg_miou", "seg mIoU"),
                 ("i2t_r1", "I2T R@1"), ("t2i_r1", "T2I R@1"), ("i2t_r5", "I2T R@5"), ("t2i_r5", "T2I R@5"))


def run_ablation(steps: int, seed: int, output_dir: Path, recipe: str = "tiny-cpu",
                 deepspeed_config: str = str(DEFAULT_DEEPSPEED_CONFIG), eval_images: int = 256,
                 overrides: tuple[str, ...] = ()) -> list[dict]:
    records = []
    for name, weights in LOSS_SETS.items():
        run_dir = output_dir / name.replace("+", "_")
        config = load_config(recipe, [
            *overrides, *(f"losses.{key}={value}" for key, value in weights.items()),
            f"train.max_steps={steps}", f"train.seed={seed}", f"train.output_dir={run_dir}",
            f"train.save_every={steps}", "train.resume=auto", "eval.every=0",
        ])
        last = train(config, deepspeed_config)
        model, tokenizer, normalization = load_for_evaluation(run_dir)
        world = ShapesWorld(seed=config.data.world_seed, image_size=config.data.world_image_size)
        metrics = evaluate_on_world(model, tokenizer, normalization, world, eval_images, crop_baseline=True)
        records.append({"losses": name, "weights": weights, "steps": steps, "seed": seed,
                        "final_train_loss": last.get("total"), **metrics})
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "ablation.json").write_text(json.dumps(records, indent=2))
    (output_dir / "ablation.md").write_text(markdown_table(records))
    return records


def markdown_table(records: list[dict]) -> str:
    header = "| losses | " + " | ".join(title for _, title in TABLE_COLUMNS) + " |"
    rule = "| --- |" + " ---: |" * len(TABLE_COLUMNS)
    rows = ["| " + record["losses"] + " | " + " | ".join(f"{record[key]:.1f}" for key, _ in TABLE_COLUMNS) + " |"
            for record in records]
    return "\n".join([header, rule, *rows]) + "\n"


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--recipe", default="tiny-cpu")
    parser.add_argument("--deepspeed_config", default=str(DEFAULT_DEEPSPEED_CONFIG))
    parser.add_argument("--eval_images", type=int, default=256)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        records = run_ablation(args.steps, args.seed, args.output_dir, args.recipe, args.deepspeed_config,
                               args.eval_images, tuple(args.overrides))
    except (ConfigError, DeepSpeedConfigError) as error:  # as launch/pretrain.py: the message, no stack
        print(f"config error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    print(markdown_table(records))


if __name__ == "__main__":
    main()
    exit_without_finalization(0)  # gloo's threads may abort a finalizing interpreter
