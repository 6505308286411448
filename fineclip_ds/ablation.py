"""The paper's loss ablation on the built-in world: same tiny model, seed and steps under L_GC,
L_GC+L_SD, L_GC+L_RC and all three; each evaluated on held-out regions and captions.

    python -m fineclip_ds.ablation --steps 200 --seed 0 --output_dir runs/ablation

writes `<output_dir>/ablation.json` (one record per loss set) and `<output_dir>/ablation.md` (the table).
Each run lives in `<output_dir>/<loss set>/` and resumes if interrupted: rerun the same command. No table is
written until every loss set has trained all its steps.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from fineclip_ds.config import ConfigError, RunConfig, load_config, override_value, positive_int
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


class AblationIncomplete(RuntimeError):
    """A loss set stopped before its last step (a stop signal): no table of half-trained models is written."""


def _set_by_ablation(weights: dict[str, float], steps: int, seed: int, run_dir: Path) -> dict[str, tuple[object, str]]:
    """What a loss set's run is given after --set, each with why it is the ablation's own: one table for both the
    overrides and the refusal of a --set that would be replaced, yet recorded in ablation.json as applied."""
    return {
        **{f"losses.{key}": (value, "each loss set's own weights") for key, value in weights.items()},
        "train.max_steps": (steps, "--steps"), "train.seed": (seed, "--seed"),
        "train.output_dir": (run_dir, "--output_dir, one folder per loss set"),
        "train.save_every": (steps, "--steps"), "train.resume": ("auto", "auto"),
        "eval.every": (0, "0: each loss set is scored once, at its end"),
    }


def _refuse_replaced_overrides(overrides: tuple[str, ...], set_by_ablation: dict[str, tuple[object, str]]) -> None:
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        if key in set_by_ablation:
            raise ConfigError(f"--set {override}: {key} is set by the ablation itself ({set_by_ablation[key][1]}), "
                              "so this value would be replaced")


def run_ablation(steps: int, seed: int, output_dir: Path, recipe: str = "tiny-cpu",
                 deepspeed_config: str = str(DEFAULT_DEEPSPEED_CONFIG), eval_images: int = 256,
                 overrides: tuple[str, ...] = ()) -> list[dict]:
    settings = {name: _set_by_ablation(weights, steps, seed, output_dir / name.replace("+", "_"))
                for name, weights in LOSS_SETS.items()}
    for loss_set_settings in settings.values():
        _refuse_replaced_overrides(overrides, loss_set_settings)
    configs = {name: load_config(recipe, [*overrides,
                                          *(f"{key}={override_value(value)}" for key, (value, _) in own.items())])
               for name, own in settings.items()}
    for config in configs.values():
        _check_same_ablation(config, steps, seed, output_dir)
    records = []
    for index, (name, config) in enumerate(configs.items(), start=1):
        print(f"ablation: {name} ({index} of {len(configs)})", file=sys.stderr, flush=True)
        train(config, deepspeed_config)
        run_dir = Path(config.train.output_dir)
        trained = _last_logged(run_dir)
        if trained is None or trained["step"] < steps:
            raise AblationIncomplete(f"{name} stopped at step {trained['step'] if trained else 0} of {steps} (a stop "
                                     "signal); rerun the same command to resume it. No table was written.")
        model, tokenizer, normalization = load_for_evaluation(run_dir)
        world = ShapesWorld(seed=config.data.world_seed, image_size=config.data.world_image_size)
        metrics = evaluate_on_world(model, tokenizer, normalization, world, eval_images, crop_baseline=True)
        records.append({"losses": name, "weights": LOSS_SETS[name], "steps": steps, "seed": seed,
                        "eval_images": eval_images, "recipe": recipe, "overrides": list(overrides),
                        "final_train_loss": trained["loss"], **metrics})
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "ablation.json").write_text(json.dumps(records, indent=2))
    (output_dir / "ablation.md").write_text(f"Loss ablation on the built-in world ({recipe}): {steps} steps, seed "
                                            f"{seed}, {eval_images} held-out images; scores in %.\n\n"
                                            + markdown_table(records))
    return records


def _check_same_ablation(config: RunConfig, steps: int, seed: int, output_dir: Path) -> None:
    """Refused before any training: train.stop_at_step (each loss set was evaluated at the step it stopped at
    and labelled with --steps), and a loss set's folder holding a run of other --steps / --seed, named in the
    ablation's words (the trainer's refusal spoke of train.max_steps and suggested a fine-tune)."""
    if config.train.stop_at_step is not None:
        raise ConfigError(f"train.stop_at_step: got {config.train.stop_at_step}; every loss set of an ablation "
                          "trains all --steps (stop it with a signal and rerun to resume)")
    recorded_file = Path(config.train.output_dir) / "config.json"
    recorded = json.loads(recorded_file.read_text())["train"] if recorded_file.is_file() else None
    if recorded and (recorded["max_steps"], recorded["seed"]) != (steps, seed):
        raise ConfigError(f"--output_dir {output_dir} holds an ablation with --steps {recorded['max_steps']} --seed "
                          f"{recorded['seed']}: rerun with those to finish or reuse it, or use a new --output_dir")


def _last_logged(run_dir: Path) -> dict | None:
    """The run's last metrics.jsonl line ({step, loss}): also there when a rerun found nothing left to train."""
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    return json.loads(lines[-1]) if lines else None


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
    parser.add_argument("--eval_images", type=positive_int, default=256)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        records = run_ablation(args.steps, args.seed, args.output_dir, args.recipe, args.deepspeed_config,
                               args.eval_images, tuple(args.overrides))
    except (ConfigError, DeepSpeedConfigError) as error:  # as launch/pretrain.py: the message, no stack
        print(f"config error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    except AblationIncomplete as error:
        print(f"ablation incomplete: {error}", file=sys.stderr)
        raise SystemExit(1) from error
    print(markdown_table(records))


if __name__ == "__main__":
    main()
    exit_without_finalization(0)  # gloo's threads may abort a finalizing interpreter
