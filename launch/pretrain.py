"""FineCLIP pre-training entry point: `deepspeed launch/pretrain.py --deepspeed_config ds_configs/zero2.json`.

Parse the command line, build the config, hand over to the training engine; no logic of its own.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import deepspeed  # noqa: E402

from fineclip_ds.config import ConfigError, load_config, override_value, positive_int  # noqa: E402
from fineclip_ds.data.streams import DataError  # noqa: E402
from fineclip_ds.run_logging import configure_rank_logging  # noqa: E402
from fineclip_ds.training.checkpoint import CheckpointSaveError  # noqa: E402
from fineclip_ds.training.engine import train  # noqa: E402
from fineclip_ds.training.nonfinite import NonFiniteLossError  # noqa: E402
from fineclip_ds.training.dry_run import plan  # noqa: E402
from fineclip_ds.training.parallelize import DeepSpeedConfigError, load_deepspeed_config  # noqa: E402
from fineclip_ds.training.process_group import exit_alone, exit_without_finalization, launcher_rank  # noqa: E402

DEFAULT_RECIPE = "tiny-cpu"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="built-in recipe name or a YAML/JSON file")
    parser.add_argument("--output_dir", help="run folder: tensorboard/, checkpoints/, metrics.jsonl")
    parser.add_argument("--max_steps", type=int, help="optimizer steps to train for")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--resume", help="'auto' (latest checkpoint of this output_dir) or a checkpoint path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set losses.w_sd=0 (repeatable)")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the resolved config, world, batch, memory estimate per GPU and FLOPs; do not train")
    parser.add_argument("--world_size", type=positive_int, default=None,
                        help="with --dry_run: plan for this many GPUs (default: $WORLD_SIZE or 1)")
    parser.add_argument("--gpus_per_node", type=positive_int, default=None,
                        help="with --dry_run: GPUs per node (default: the launcher's processes per node, "
                             "$LOCAL_WORLD_SIZE or $LOCAL_SIZE, where the world is $WORLD_SIZE; else 8)")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    deepspeed.add_config_arguments(parser)
    args = parser.parse_args(argv)
    if not args.deepspeed_config:
        parser.error("--deepspeed_config is required (e.g. ds_configs/zero2.json)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_rank_logging(launcher_rank())
    overrides = list(args.set)
    for field, value in (("output_dir", args.output_dir), ("max_steps", args.max_steps), ("seed", args.seed),
                         ("resume", args.resume)):
        if value is not None:
            overrides.append(f"train.{field}={override_value(value)}")
    try:
        config = load_config(args.recipe, overrides)
        if args.dry_run:
            world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
            gpus_per_node = args.gpus_per_node or 8
            if args.world_size is None and args.gpus_per_node is None:  # planning the launch it runs under
                gpus_per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 8)
            report = plan(config, load_deepspeed_config(args.deepspeed_config), world_size, gpus_per_node)
            print(json.dumps(report, indent=2))
            return 0
        train(config, args.deepspeed_config)
    except (ConfigError, DeepSpeedConfigError) as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    except DataError as error:  # shards too small or unusable: a message, not a worker's traceback per rank
        print(f"data error: {error.reason()}", file=sys.stderr)
        exit_alone(2)  # this rank's shards: its peers may be waiting for it in the first step
    except NonFiniteLossError as error:
        print(f"training stopped: {error}", file=sys.stderr)
        return 3
    except CheckpointSaveError as error:  # this rank's write failed: its peers may wait for it in the save
        print(f"checkpoint error: {error}", file=sys.stderr)
        exit_alone(1)
    return 0


if __name__ == "__main__":
    exit_without_finalization(main())  # every return of main is reached by all ranks together
