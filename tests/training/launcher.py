"""Run launch/pretrain.py under DeepSpeed's real launcher in a subprocess, as a user would."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
GLOBAL_BATCH = 8
COMMON = ("--max_steps", str(STEPS), "--set", "optim.lr=1e-4", "--set", "optim.warmup_steps=1",
          "--set", "train.save_every=2", "--set", "data.max_boxes=4", "--set", "eval.every=2",
          "--set", "eval.images=16", "--set", "eval.batch_size=8")
# the fault-injection runs: 2 ranks x 16 images, saved every 4 of 12 steps
FAULT_STEPS = 12
FAULT_JOB = ("--max_steps", str(FAULT_STEPS), "--set", "optim.lr=1e-4", "--set", "optim.warmup_steps=1",
             "--set", "train.save_every=4", "--set", "data.max_boxes=4")
NONFINITE_SCRIPT = Path(__file__).with_name("nonfinite_pretrain.py")
LOCAL_LAUNCH = Path(__file__).with_name("local_launch.py")


def nonfinite_env(kind: str, calls: str, rank: int) -> dict[str, str]:
    """The environment of NONFINITE_SCRIPT: a non-finite `kind` ('loss' or 'gradient') at forward `calls` on `rank`."""
    return {"FINECLIP_TEST_NONFINITE_KIND": kind, "FINECLIP_TEST_NONFINITE_CALLS": calls,
            "FINECLIP_TEST_NONFINITE_RANK": str(rank)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_ds_config(path: Path, micro_batch: int, stage: int, accumulation: int = 1) -> Path:
    base = json.loads((REPO / "ds_configs" / f"zero{3 if stage == 3 else 2}.json").read_text())
    base["train_micro_batch_size_per_gpu"] = micro_batch
    base["gradient_accumulation_steps"] = accumulation
    path.write_text(json.dumps(base))
    return path


def pretrain_command(ds_config: Path, output_dir: Path, *args: str, script: Path = REPO / "launch" / "pretrain.py",
                     runner: bool = False) -> list[str]:
    """`runner`: through the `deepspeed` runner, as users start it; otherwise DeepSpeed's per-node launcher directly
    (LOCAL_LAUNCH), ~3 s less per run."""
    launcher = ["-m", "deepspeed.launcher.runner"] if runner else [str(LOCAL_LAUNCH)]
    return [
        sys.executable, *launcher, "--master_port", str(free_port()),
        str(script), "--deepspeed_config", str(ds_config), "--output_dir", str(output_dir),
        "--set", "data.num_workers=0", "--set", "train.log_every=1", *args,
    ]


def launcher_env(processes: int, **extra: str) -> dict[str, str]:
    return {**os.environ, "LOCAL_SIZE": str(processes), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}


def run_pretrain(processes: int, ds_config: Path, output_dir: Path, *args: str, timeout: int = 300,
                 script: Path = REPO / "launch" / "pretrain.py", check: bool = True,
                 env: dict[str, str] | None = None, runner: bool = False) -> subprocess.CompletedProcess:
    result = subprocess.run(pretrain_command(ds_config, output_dir, *args, script=script, runner=runner), cwd=REPO,
                            env=launcher_env(processes, **(env or {})), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"pretrain failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def losses(output_dir: Path) -> list[tuple[int, float]]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [(record["step"], record["loss"]) for record in map(json.loads, lines)]


def reference_runs(root: Path) -> dict[str, Path]:
    """The same 4-step job as 1 process (ZeRO-2), 2 processes (ZeRO-2) and 2 processes (ZeRO-3)."""
    results = {}
    for name, processes, stage in (("one_zero2", 1, 2), ("two_zero2", 2, 2), ("two_zero3", 2, 3)):
        config = write_ds_config(root / f"{name}.json", GLOBAL_BATCH // processes, stage)
        run_pretrain(processes, config, root / name, *COMMON, runner=True)
        results[name] = root / name
    return results
