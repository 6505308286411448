"""One device call's worth of GPU checks, most important first, inside a time budget.

A session lent a GPU has 15 minutes of device time in all, the machine's start included, and at most
10 minutes per command. This runs what issues 4 and 7 still owe in priority order, each step under its
own time cap (cut to what is left of --budget_s), and writes into --out as it goes:
  rows.md             every benchmark row, as measured (the scripts write rows one by one);
  steps.md            per step: done, failed, cut off at its cap, or not started; seconds; exit status;
                      and the `--steps` a next call would run for what is left;
  session.log         everything the steps printed, each under its heading (also echoed here);
  bigg_summary.json   the ViT-bigG/14 ZeRO-3 run's summary (samples/s, TFLOP/s, MFU, peak memory).
Run from the repository root on the GPU machine, after the wheels' install line of BENCHMARKS.md:
`python3 benchmarks/gpu_session.py --out $OUT --budget_s 540`.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = Path("/tmp")
BIGG_RUN = SCRATCH / f"fineclip_bigg_zero3_{os.getpid()}"  # this session's own: a warm machine keeps /tmp
# What a session leaves in /tmp: its bigG run (a ~27 GB ZeRO-3 checkpoint, estimated) and, when gpu_make_regions is
# cut off, its random OPT-2.7b (7.5 GB). The machine runs one command at a time, so any found at a start are an
# earlier call's: on a warm machine they would fill its 64 GiB disk within two calls.
LEFTOVERS = ("fineclip_bigg_zero3_*", "make_regions_bench_*")
KILL_GRACE_S = 10.0

ENVIRONMENT_SCRIPT = """
import importlib, subprocess, torch, triton
print(subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True).stdout.strip())
properties = torch.cuda.get_device_properties(0)
print(f'torch {torch.__version__}, triton {triton.__version__}, {properties.name}, '
      f'{properties.multi_processor_count} SMs, {properties.total_memory / 2**30:.0f} GiB')
for name in ('deepspeed', 'open_clip', 'webdataset', 'inf_cl', 'flash_attn', 'transformers'):
    try:
        print(name, getattr(importlib.import_module(name), '__version__', 'imported'))
    except Exception as error:
        print(name, 'NOT IMPORTABLE:', repr(error)[:200])
"""


@dataclass(frozen=True)
class Step:
    name: str
    command: tuple[str, ...]  # "{out}" stands for the --out folder
    cap_s: float  # the longest it may run
    min_s: float  # not started with less left than this: it could not finish anything useful
    owed: str  # what it shows, for steps.md


def _script(name: str, *args: str) -> tuple[str, ...]:
    return (sys.executable, f"benchmarks/{name}", *args, "--output", "{out}/rows.md")


def _pytest(*args: str) -> tuple[str, ...]:
    """Quiet, with a summary of failures, errors and skips. pytest prints that summary only at the end, so a
    step that may be cut off at its cap adds -v, which names each test as it passes."""
    quiet = () if "-v" in args else ("-q",)  # -q and -v cancel out: the names were not printed
    return (sys.executable, "-m", "pytest", *quiet, "-rfEs", "-p", "no:cacheprovider", *args)


BIGG_ARGUMENTS = ("--recipe", "vit-bigg-14", "--deepspeed_config", "ds_configs/zero3_vit_bigg.json",
                  "--set", "data.source=synthetic", "--set", "data.world_image_size=224", "--max_steps", "9",
                  "--set", "train.log_every=3", "--output_dir", str(BIGG_RUN))

# Issue 7's targets were measured on the first H100 session (2026-11-26): its steps come last. The
# contrastive kernels were rewritten after that session, so their tests run before any timing of them.
# kernels.contrastive.launch.CANDIDATE_HALF_TILES, compiled spill-free there (a test keeps the two the same)
CANDIDATE_TILES = ("64x128x32", "128x64x32")
STEPS = (
    Step("environment", (sys.executable, "-c", ENVIRONMENT_SCRIPT), 60, 5, "device, versions, imports"),
    Step("kernel_tests", _pytest("-v", "-m", "not slow", "tests/kernels", "tests/models/test_attention.py",
                                 "--ignore=tests/kernels/test_gpu_codegen.py"), 240, 60,
         "issue 4: every kernel test case compiled on the GPU vs float64; flash attention numerics"),
    Step("contrastive", _script("gpu_contrastive.py", "--sizes", "4096", "16384", "65536", "--dims", "512",
                                "--repeat_budget_s", "2", "--tiles", *CANDIDATE_TILES), 180, 60,
         "issue 4: loss vs ClipLoss, torch_tiled and inf-cl, N = 4k to 64k, D = 512, three tile shapes"),
    Step("roi_pool", _script("gpu_roi_pool.py", "--batches", "32", "256", "--regions", "20", "100",
                             "--grids", "14", "40", "--channels", "1024"), 120, 30,
         "issue 4: region pooling vs torchvision, 8 sizes at C = 1024, all three paths timed interleaved"),
    Step("contrastive_1m", _script("gpu_contrastive.py", "--sizes", "1048576", "--dims", "512",
                                   "--repeat_budget_s", "0"), 300, 120,
         "issue 4: the loss at N = 1M on one GPU, against inf-cl"),
    Step("contrastive_sweep", _script("gpu_contrastive.py", "--sizes", "16384", "65536", "262144",
                                      "--dims", "1024", "--repeat_budget_s", "2"), 300, 90,
         "issue 4: the loss at D = 1024"),
    Step("make_regions", _script("gpu_make_regions.py"), 300, 120, "BLIP-2 OPT-2.7b captioning throughput"),
    Step("roi_pool_sweep", _script("gpu_roi_pool.py"), 420, 120, "issue 4: all 54 region pooling sizes"),
    Step("rank_agreement", _pytest("tests/training/test_rank_agreement.py"), 90, 30,
         "the per-step agreement collectives on an NCCL group"),
    Step("training_step", _script("gpu_training_step.py", "--models", "ViT-L-14:32", "ViT-B-16:64",
                                  "--attention", "sdpa", "--steps", "5"), 180, 60,
         "issue 7 (measured 2026-11-26): ViT-L/14 and ViT-B/16 steps with SDPA, with and without checkpointing"),
    Step("bigg_zero3", (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                        "launch/pretrain.py", *BIGG_ARGUMENTS), 300, 180,
         "issue 7 (measured 2026-11-26): ViT-bigG/14 trains with ZeRO-3 + checkpointing"),
    Step("training_sweep", _script("gpu_training_step.py"), 420, 120,
         "issue 7: both models, every attention backend, with and without checkpointing"),
)
STEP_NAMES = tuple(step.name for step in STEPS)


@dataclass
class Outcome:
    step: Step
    status: str
    seconds: float = 0.0
    exit_status: int | None = None


def _copy_lines(source: TextIO, sinks: tuple[TextIO, ...]) -> None:
    for line in source:
        for sink in sinks:
            sink.write(line)
            sink.flush()


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc, those in sessions of their own included: torchrun starts its
    workers with start_new_session=True, so a signal to the step's process group never reaches them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _kill(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def run_step(step: Step, out: Path, cap_s: float, log: TextIO) -> Outcome:
    """Runs one step in its own process group, echoing its output to the log and stdout; at its cap
    the whole group and every descendant (torchrun's workers run in sessions of their own) get SIGTERM, then
    SIGKILL after a grace period: a worker left running would hold the GPU through the steps after it."""
    command = [part.replace("{out}", str(out)) for part in step.command]
    header = f"\n===== {step.name} (cap {cap_s:.0f} s): {' '.join(command)}\n"
    for sink in (log, sys.stdout):
        sink.write(header)
        sink.flush()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors="replace", start_new_session=True)
    copier = threading.Thread(target=_copy_lines, args=(process.stdout, (log, sys.stdout)), daemon=True)
    copier.start()
    try:
        exit_status = process.wait(timeout=cap_s)
        status = "done" if exit_status == 0 else "failed"
    except subprocess.TimeoutExpired:
        tree = _descendants(process.pid)  # now: once the launcher is gone its orphans belong to PID 1
        os.killpg(process.pid, signal.SIGTERM)
        _kill(tree, signal.SIGTERM)
        try:
            process.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        _kill(tree, signal.SIGKILL)  # whatever outlived the grace (a worker saving a checkpoint on SIGTERM)
        exit_status, status = process.returncode, f"cut off at {cap_s:.0f} s"
    copier.join(timeout=KILL_GRACE_S)
    return Outcome(step, status, time.monotonic() - started, exit_status)


def write_report(outcomes: list[Outcome], path: Path, budget_s: float) -> None:
    lines = [f"# GPU session steps (budget {budget_s:.0f} s)", "",
             "| step | status | seconds | exit status | shows |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {o.step.name} | {o.status} | {o.seconds:.0f} | {'' if o.exit_status is None else o.exit_status} "
              f"| {o.step.owed} |" for o in outcomes]
    left = [o.step.name for o in outcomes if o.status != "done"]
    lines += ["", f"Next call: `python3 benchmarks/gpu_session.py --out $OUT --steps {' '.join(left)}`" if left
              else "Every step is done."]
    path.write_text("\n".join(lines) + "\n")


def run_session(steps: list[Step], out: Path, budget_s: float) -> list[Outcome]:
    """Each step in order while the budget lasts; a step that needs more than is left is passed over
    for the smaller ones after it. steps.md is rewritten after every step."""
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget_s
    outcomes = [Outcome(step, "not started") for step in steps]
    with (out / "session.log").open("a") as log:
        for index, step in enumerate(steps):
            left = deadline - time.monotonic()
            if left < step.min_s:
                outcomes[index].status = f"not started: needs {step.min_s:.0f} s, {max(left, 0):.0f} s left"
            else:
                outcomes[index] = run_step(step, out, min(step.cap_s, left), log)
            write_report(outcomes, out / "steps.md", budget_s)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for rows.md, steps.md, session.log")
    parser.add_argument("--budget_s", type=float, default=540.0, help="seconds for all steps together")
    parser.add_argument("--steps", nargs="+", choices=STEP_NAMES, default=list(STEP_NAMES),
                        help="steps to run, in the order given (default: all, most important first)")
    args = parser.parse_args(argv)
    by_name = {step.name: step for step in STEPS}
    out = args.out.resolve()
    for leftover in (path for pattern in LEFTOVERS for path in SCRATCH.glob(pattern)):
        shutil.rmtree(leftover, ignore_errors=True)
    outcomes = run_session([by_name[name] for name in args.steps], out, args.budget_s)
    if (BIGG_RUN / "summary.json").exists():
        shutil.copy(BIGG_RUN / "summary.json", out / "bigg_summary.json")
    shutil.rmtree(BIGG_RUN, ignore_errors=True)  # its summary is all the session reports
    print((out / "steps.md").read_text())
    return 0 if all(outcome.status == "done" for outcome in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
