"""The training loop: build from config, apply DeepSpeed, step, report, checkpoint, resume."""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from fineclip_ds.config import ConfigError, KernelConfig, RunConfig
from fineclip_ds.data.shapes_world import ShapesWorld
from fineclip_ds.files import write_atomically
from fineclip_ds.losses.objective import FineCLIPObjective
from fineclip_ds.models.factory import create_fineclip
from fineclip_ds.run_layout import checkpoints_folder, set_aside_earlier_logs
from fineclip_ds.training import checkpoint
from fineclip_ds.training.build import build_train_stream
from fineclip_ds.models.flops import FineCLIPShapes, step_flops
from fineclip_ds.training.metrics import RunTotals, Throughput, device_name, peak_memory_mb, peak_tflops
from fineclip_ds.training.monitor import Monitor
from fineclip_ds.training.optimizer import build_optimizer, build_scheduler, warn_if_warmup_outlasts
from fineclip_ds.training.nonfinite import NonFiniteGuard, NonFiniteLossError, is_fp16_scale_at_minimum
from fineclip_ds.training.periodic_eval import evaluate_during_training
from fineclip_ds.training.preemption import PreemptionWatch
from fineclip_ds.training.process_group import init_process_group
from fineclip_ds.training.parallelize import (adapt_precision_to_device, initialize, load_deepspeed_config,
                                              offloads_optimizer, require_nonfinite_gradient_check,
                                              resolve_batch_sizes)
from kernels.contrastive.launch import runs_on as contrastive_runs_on
from kernels.roi_pool.launch import runs_on as region_pool_runs_on

if TYPE_CHECKING:  # annotations only
    import deepspeed

    from fineclip_ds.data.streams import SyntheticStream, WebDatasetStream
    from fineclip_ds.models.factory import Tokenizer
    from fineclip_ds.models.fineclip import FineCLIP

log = logging.getLogger("fineclip_ds")
BATCH_TENSORS = ("images", "texts", "boxes", "box_mask", "region_texts")
OPTIONAL_TENSORS = ("crop_images",)  # with losses.crop_source_scale > 1
IMAGE_TENSORS = ("images", "crop_images")
# Where a job script asks to be told that a stop signal ended the run (checkpoint written, exit 0),
# so that it requeues itself (launch/slurm_pretrain.sbatch); rank 0 writes the step there.
REQUEUE_FILE_VARIABLE = "FINECLIP_REQUEUE_FILE"
# Set to 1 by that job script on an allocation Slurm requeued (its own requeue, a node failure, a requeue by hand).
REQUEUED_VARIABLE = "FINECLIP_REQUEUED"
KERNEL_DEVICES = {"region_pool": region_pool_runs_on, "contrastive": contrastive_runs_on}  # kernels.<field>


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resume_of_a_requeued_job(resume: str | None, checkpoint_dir: Path) -> str | None:
    """A requeued job continues from the latest checkpoint this job saved, whatever --resume started it: an
    sbatch ... --resume PATH otherwise restarted every allocation from PATH and, finding the run's own
    checkpoints, stopped (exit 2). Before the job's first save it starts as --resume says, a rollback to an
    older tag of the run included (the later tags' `latest` is not this job's)."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get(REQUEUED_VARIABLE) == "1" and job is not None and checkpoint.job_of_latest(checkpoint_dir) == job:
        return "auto"
    return resume


def require_kernel_devices(kernels: KernelConfig, device: torch.device) -> None:
    """A Triton backend this device cannot run, refused at start by its field: the kernel itself refuses it
    only in the first step, after the model is built, with a traceback per rank. Not in config.validate:
    a dry run plans GPU runs from a machine without one."""
    for field, runs_on in KERNEL_DEVICES.items():
        if getattr(kernels, field) == "triton" and not runs_on(device):
            raise ConfigError(f"kernels.{field}: got 'triton', which runs on CUDA (or with TRITON_INTERPRET=1, "
                              f"Triton's slow CPU interpreter), but this run is on {device.type}; expected 'auto' "
                              "(triton on CUDA, torch elsewhere) or 'torch'")


def require_writable_run_folder(checkpoint_dir: Path, rank: int, world_size: int, device: torch.device) -> None:
    """Collective. Every rank, before the model is built: the run's folders are made and written to once. A
    read-only file system, an output_dir that is a file or lies under one failed only after the model and
    DeepSpeed were built, with a traceback; the checkpoint folder made now also tells a save later that the run
    folder moved. Every rank learns which ranks failed (a node-local output_dir may be read-only on one node
    only), so all stop together instead of the others waiting for them in DeepSpeed's first collective."""
    probe = checkpoint_dir / f".write_check_rank{rank}"
    problem = None
    try:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        problem = error
    failed = torch.zeros(world_size, device=device)
    failed[rank] = problem is not None
    if world_size > 1:
        dist.all_reduce(failed)  # device: the process group's (NCCL reduces CUDA tensors only)
    if problem is not None:
        raise ConfigError(f"train.output_dir {checkpoint_dir.parent}: cannot write there ({problem})") from problem
    if failed.any():
        ranks = ", ".join(str(index) for index in failed.nonzero().flatten().tolist())
        raise ConfigError(f"train.output_dir {checkpoint_dir.parent}: rank(s) {ranks} cannot write there (their "
                          "messages say why)")


def _process_group_device(on_gpu: bool) -> torch.device:
    """Where this rank's collectives run before the engine exists: its GPU (LOCAL_RANK, as DeepSpeed picks it),
    else the CPU."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_gpu else torch.device("cpu")


def warn_if_no_regions(counts: Counter, step: int) -> None:
    """Batches without a single region train L_SD and L_RC on nothing (both 0): records whose boxes sit under
    another member name than `json`, or boxes all dropped. Said once, at the first logged step."""
    if counts["samples"] and not counts["regions"]:
        reasons = {reason: count for reason, count in counts.items() if reason not in ("samples", "regions")}
        log.warning("no region in the %d samples of the first %d step(s): loss/sd and loss/rc train nothing; records "
                    "need a `json` member with boxes and region_captions (data counts: %s)", counts["samples"], step,
                    reasons)


def _to_device(batch: dict[str, Any], device: torch.device, image_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    moved = {key: batch[key].to(device, non_blocking=True)
             for key in BATCH_TENSORS + OPTIONAL_TENSORS if key in batch}
    for key in IMAGE_TENSORS:
        if key in moved:
            moved[key] = moved[key].to(image_dtype)
    return moved


def _mean_over_ranks(values: dict[str, torch.Tensor], world_size: int) -> dict[str, float]:
    names = sorted(values)
    stacked = torch.stack([values[name].float().reshape(()) for name in names])
    if world_size > 1:
        dist.all_reduce(stacked)
        stacked /= world_size
    return dict(zip(names, stacked.tolist()))


def _device_figures_over_ranks(speed: dict[str, float], world_size: int, device: torch.device) -> dict[str, float]:
    """Collective. `speed` (a Throughput reading) with TFLOP/s per device averaged over the ranks and
    the highest peak memory of any rank added: ranks hold different numbers of boxes (L_SD runs the
    image tower once per box), so rank 0's own FLOPs and memory are one sample, not the run's figure.
    The FLOPs are averaged, then timed by this rank's clock as samples/s is: ranks start their windows
    apart (rank 0 sets up the logging first), so averaging each rank's own rate would mix clocks."""
    teraflop_per_step = torch.tensor([speed["tflops_per_device"] * speed["step_time_s"]], dtype=torch.float64,
                                     device=device)
    memory = torch.tensor([peak_memory_mb()], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(teraflop_per_step)
        dist.all_reduce(memory, op=dist.ReduceOp.MAX)
    tflops = teraflop_per_step.item() / world_size / max(speed["step_time_s"], 1e-9)
    return {**speed, "tflops_per_device": tflops, "peak_memory_mb": memory.item()}


def _sum_counters_over_ranks(counter: Counter, world_size: int) -> Counter:
    if world_size == 1:
        return counter
    gathered: list[Counter] = [Counter() for _ in range(world_size)]
    dist.all_gather_object(gathered, counter)
    return sum(gathered, Counter())


@dataclass
class Run:
    """One start of a run as `set_up` built it: what every step uses, and the counts carried on from the
    checkpoint it resumed from, which its steps grow and its checkpoints save."""
    config: RunConfig
    rank: int
    world_size: int
    output_dir: Path
    checkpoint_dir: Path
    model: FineCLIP
    tokenizer: Tokenizer
    normalization: tuple[tuple[float, ...], tuple[float, ...]]  # image mean, std
    objective: FineCLIPObjective
    engine: deepspeed.DeepSpeedEngine  # around `objective`
    image_dtype: torch.dtype  # images are cast to the engine's precision
    micro_batch: int
    accumulation: int  # micro-batches per optimizer step
    stream: SyntheticStream | WebDatasetStream  # this rank's share of the data
    stop_step: int
    shapes: FineCLIPShapes | None  # None: this tower's FLOPs are not modelled (no TFLOP/s, no MFU)
    text_trainable: bool
    peak_tflops: float | None  # this device's bf16 peak; None: no MFU
    nonfinite: NonFiniteGuard
    start_step: int = 0
    # samples, regions and skips by reason; rank 0's go on from the checkpoint's (summed over its ranks)
    data_counts: Counter = dataclasses.field(default_factory=Counter)
    earlier_starts: RunTotals = dataclasses.field(default_factory=RunTotals)
    saved: bool = False  # this start has saved a checkpoint (its first save sets a superseded continuation aside)


@dataclass
class Clocks:
    """This start's samples/s, step time and TFLOP/s: `since_log` for each log step, `this_start` for the run's
    totals. Evaluation and checkpoint saves are not training: they run `paused`."""
    since_log: Throughput = dataclasses.field(default_factory=Throughput)
    this_start: Throughput = dataclasses.field(default_factory=Throughput)

    def update(self, samples: int, flops: int) -> None:
        self.since_log.update(samples, flops)
        self.this_start.update(samples, flops)

    @contextmanager
    def paused(self) -> Iterator[None]:
        with self.since_log.paused(), self.this_start.paused():
            yield


def train(config: RunConfig, deepspeed_config_path: str) -> dict[str, float]:
    """Run to `config.train.max_steps` (or `stop_at_step`); returns the last step's rank-averaged terms.

    Works under the deepspeed/torchrun launchers and as a plain single process. Every rank makes the calls
    marked Collective in the same order: a rank that skips or reorders one hangs the others."""
    run = set_up(config, deepspeed_config_path)
    monitor = Monitor(run.output_dir, run.stop_step, run.start_step, enabled=run.rank == 0)
    batches = iter(run.stream)
    logged_counts = False  # the data counts of this start not logged yet
    last: dict[str, float] = {}
    run.engine.train()
    preemption = PreemptionWatch()
    steps = range(run.start_step, run.stop_step)
    try:
        feed = _with_first_batch_fetched(batches) if steps else batches
        clocks = Clocks()  # after the monitor's and the data's start-up: they stay out of the figures
        for step in steps:
            applied_lr = run.engine.get_lr()[0]  # engine.step() moves the schedule on to the next step's lr
            last = train_step(run, clocks, feed, step)
            done = step + 1
            is_log_step = done % config.train.log_every == 0 or done == run.stop_step
            speed = (_device_figures_over_ranks(clocks.since_log.read(), run.world_size, run.engine.device)
                     if is_log_step else None)
            monitor.step(done, last["total"], speed["samples_per_s"] if speed else None)
            if is_log_step:
                monitor.scalars(done, log_step_scalars(run, done, last, applied_lr, speed, first=not logged_counts))
                logged_counts = True
            # evaluation and checkpoints are not training: their time stays out of samples/s, TFLOP/s and MFU
            if config.eval.every and (done % config.eval.every == 0 or done == config.train.max_steps):
                _evaluate(run, clocks, monitor, done)
            preempted = preemption.requested(run.world_size, run.engine.device)
            if done % config.train.save_every == 0 or done == run.stop_step or preempted:
                with clocks.paused():
                    _save(run, clocks, done)
            if preempted and done < run.stop_step:  # at the last step the run is done: nothing to requeue
                log.warning("stopped by signal after step %d; resume with --resume auto", done)
                if run.rank == 0 and os.environ.get(REQUEUE_FILE_VARIABLE):
                    Path(os.environ[REQUEUE_FILE_VARIABLE]).write_text(f"{done}\n")
                break
    finally:
        # The DataLoader workers end here, on an error too: they ignore SIGTERM (data/workers.py), so those left
        # to the interpreter's exit (which terminates, then joins them) kept the process alive for good.
        batches.close()
    summary = run_summary(run, clocks)
    if clocks.this_start.peek()["steps"]:
        monitor.summary(summary)
    elif run.rank == 0 and run.stop_step < config.train.max_steps:  # a stop_at_step the run has already passed
        log.warning("train.stop_at_step=%d is not after step %d, which this run resumed at: nothing was trained "
                    "(train.max_steps=%d)", run.stop_step, run.start_step, config.train.max_steps)
    elif run.rank == 0:  # resumed at its last step: 0 samples/s would replace the figures of the steps that did run
        log.info("no step left to train (resumed at step %d): %s kept", run.start_step,
                 run.output_dir / "summary.json")
    monitor.close()
    return last


def _with_first_batch_fetched(batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """`batches`, its first batch already fetched: the DataLoader's start-up, and a resume's fast-forward through
    the records its shards had already given, are not training and must not slow the first logged window."""
    return itertools.chain([next(batches)], batches)


def set_up(config: RunConfig, deepspeed_config_path: str) -> Run:
    """Collective. Everything before the first step, on every rank. A bad DeepSpeed JSON, kernel choice or
    --resume fails first, with its message, before a model is built."""
    rank, world_size = init_process_group()
    on_gpu = torch.cuda.is_available()
    output_dir = Path(config.train.output_dir)
    checkpoint_dir = checkpoints_folder(output_dir)

    ds_config = adapt_precision_to_device(load_deepspeed_config(deepspeed_config_path), on_gpu)
    require_nonfinite_gradient_check(ds_config)
    resolve_batch_sizes(ds_config, world_size)  # DeepSpeed's own check is a bare assertion
    require_kernel_devices(config.kernels, torch.device("cuda" if on_gpu else "cpu"))
    config.train.resume = resume_of_a_requeued_job(config.train.resume, checkpoint_dir)
    resume_point = checkpoint.find_resume_point(config.train.resume, checkpoint_dir)
    if resume_point is not None:
        checkpoint.check_same_run_settings(resume_point, config, checkpoint_dir)
    require_writable_run_folder(checkpoint_dir, rank, world_size, _process_group_device(on_gpu))
    if resume_point is None and rank == 0 and (earlier := set_aside_earlier_logs(output_dir)):
        log.warning("train.output_dir %s held the logs of an earlier start with no checkpoint to resume: moved to %s",
                    output_dir, earlier)

    seed_everything(config.train.seed)
    model, tokenizer, normalization = create_fineclip(config.model, announce=rank == 0)
    objective = FineCLIPObjective(model, config.losses, config.kernels)
    optimizer = build_optimizer(objective, config.optim, cpu_offload=offloads_optimizer(ds_config))
    scheduler = build_scheduler(optimizer, config.optim, config.train.max_steps)
    if rank == 0:
        warn_if_warmup_outlasts(config.optim, config.train.max_steps)
    if resume_point is not None:
        checkpoint.check_same_model(resume_point, objective)
        resume_point = _universal_if_resized(resume_point, ds_config, rank, world_size, checkpoint_dir)
    engine = initialize(objective, optimizer, scheduler, ds_config, model.parameters_read_outside_owner_forward())
    image_dtype = (torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled()
                   else torch.float32)
    micro_batch, accumulation = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    stream = build_train_stream(
        config.data, model.image_size, normalization, tokenizer, micro_batch, rank, world_size, config.train.seed,
        crop_source_scale=config.losses.crop_source_scale,
    )

    run = Run(config, rank, world_size, output_dir, checkpoint_dir, model, tokenizer, normalization, objective, engine,
              image_dtype, micro_batch, accumulation, stream,
              stop_step=config.train.stop_at_step or config.train.max_steps,
              shapes=FineCLIPShapes.of(model.clip),
              text_trainable=any(p.requires_grad for p in model.text_parameters()),
              peak_tflops=peak_tflops(device_name()),
              nonfinite=NonFiniteGuard(config.train.max_consecutive_nonfinite))
    if resume_point is not None:
        _restore(run, resume_point)
    if rank == 0:
        write_atomically(output_dir / "config.json", json.dumps(config.to_dict(), indent=2))
    return run


def _universal_if_resized(point: checkpoint.ResumePoint, ds_config: dict[str, Any], rank: int,
                          world_size: int, checkpoint_dir: Path) -> checkpoint.ResumePoint:
    """Collective when it converts. A checkpoint another number of ranks wrote loads only from DeepSpeed's
    universal checkpoint: converted here (once, by rank 0, into this run's `checkpoint_dir`), and
    `ds_config` told to load it."""
    saved_ranks = checkpoint.saved_world_size(point)
    if saved_ranks in (0, world_size):
        return point
    log.info("checkpoint %s was written by %d ranks, this run has %d: resuming through DeepSpeed's "
             "universal checkpoint", point.tag, saved_ranks, world_size)
    point = checkpoint.convert_to_universal(point, rank, into=checkpoint_dir)
    ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return point


def _restore(run: Run, point: checkpoint.ResumePoint) -> None:
    """Collective. The engine's state, the data position and the run's counts from the checkpoint at `point`."""
    state = checkpoint.load(run.engine, point)
    run.start_step = state["step"]
    run.stream.load_state_dict(state["stream"])
    # the run's totals so far (summed over ranks when saved): rank 0 carries them on, at any world size
    run.data_counts = Counter(state.get("data_counts", {}) if run.rank == 0 else {})
    run.nonfinite.skipped = state.get("skipped_nonfinite", 0)
    run.earlier_starts = RunTotals.from_state(state.get("run_totals"))
    log.info("resumed from %s/%s at step %d", point.directory, point.tag, run.start_step)


def train_step(run: Run, clocks: Clocks, batches: Iterator[dict[str, Any]], step: int) -> dict[str, float]:
    """Collective. One optimizer step over `run.accumulation` micro-batches; returns its terms averaged over them
    and over the ranks.

    A micro-batch whose loss is non-finite on any rank is skipped on every rank, before backward; a step DeepSpeed
    drops for a non-finite gradient is redone with new micro-batches. Too many skips in a row save a checkpoint
    and raise NonFiniteLossError."""
    engine, nonfinite = run.engine, run.nonfinite
    step_terms: list[dict[str, torch.Tensor]] = []
    flops = 0
    while len(step_terms) < run.accumulation:
        batch = next(batches)
        run.data_counts.update(batch["data_stats"])
        loss, terms = engine(_to_device(batch, engine.device, run.image_dtype))
        if not nonfinite.all_ranks_finite(loss, run.world_size):
            _stop_if_exhausted(run, clocks, step, "loss")
            continue  # skipped on every rank together: no backward, no optimizer step
        engine.backward(loss)
        skipped_before = engine.skipped_steps
        try:
            engine.step()
        except Exception as error:
            if not is_fp16_scale_at_minimum(error):
                raise
            _save(run, clocks, step)  # the step was dropped: weights and Adam state are the last good ones
            raise NonFiniteLossError(
                f"fp16's loss scale reached fp16.min_loss_scale with gradients still NaN/inf at step {step}; the "
                f"last good state is saved in {run.checkpoint_dir}/{checkpoint.tag_for_step(step)}. Lower optim.lr, "
                "check the data, or train in bf16") from error
        if engine.skipped_steps > skipped_before:
            # DeepSpeed found a NaN/inf gradient (or, in fp16, a loss scale too high) on some rank: every
            # rank dropped this step's gradients and kept weights, Adam state and lr; redo the step
            # fp16's dynamic loss scaler skips while it searches for its scale (and raises at its minimum); a static
            # scale never changes, so its skips are as final as bf16/fp32 ones
            if not (engine.fp16_enabled() and engine.dynamic_loss_scale()):
                nonfinite.skip()
                _stop_if_exhausted(run, clocks, step, "gradient")
            step_terms, flops = [], 0
            continue
        if engine.was_step_applied():
            nonfinite.step_applied()
        step_terms.append({"total": loss.detach(), **terms})
        flops += _batch_flops(run, batch)
    samples = run.micro_batch * run.accumulation * run.world_size
    clocks.update(samples, flops)
    averaged = {name: torch.stack([t[name] for t in step_terms]).mean() for name in step_terms[0]}
    return _mean_over_ranks(averaged, run.world_size)


def _batch_flops(run: Run, batch: dict[str, Any]) -> int:
    """Model FLOPs this rank computed for `batch` (0 where the tower's FLOPs are not modelled)."""
    # box_mask: [B, R], True for the slots that hold a box
    if run.shapes is None:
        return 0
    images, slots = batch["box_mask"].shape
    return step_flops(run.shapes, images, int(batch["box_mask"].sum()), images * slots, run.world_size,
                      run.text_trainable, run.config.losses.sd_teacher_grad, run.objective.weights)


def _stop_if_exhausted(run: Run, clocks: Clocks, step: int, what: str) -> None:
    """Collective. After too many non-finite skips in a row: the last good state saved, then NonFiniteLossError."""
    if run.nonfinite.exhausted:
        _save(run, clocks, step)
        raise NonFiniteLossError(
            f"{run.nonfinite.in_a_row} micro-batches or optimizer steps in a row were skipped, the last for a "
            f"non-finite {what} at step {step}; the last good state is saved in {run.checkpoint_dir}/"
            f"{checkpoint.tag_for_step(step)}. Lower optim.lr or check the data; "
            f"train.max_consecutive_nonfinite={run.config.train.max_consecutive_nonfinite}")


def log_step_scalars(run: Run, step: int, last: dict[str, float], applied_lr: float, speed: dict[str, float],
                     first: bool) -> dict[str, float]:
    """Collective (the data counts are summed over ranks). The TensorBoard scalars of a log step: the step's
    rank-averaged terms, lr, speed and data counts. At this start's `first` log step rank 0 also warns when no
    batch had a region to train L_SD or L_RC on."""
    counts = _sum_counters_over_ranks(run.data_counts, run.world_size)
    losses = run.config.losses
    if run.rank == 0 and first and (losses.w_sd or losses.w_rc):
        warn_if_no_regions(counts, step)
    scalars = {f"loss/{name}": value for name, value in last.items() if name != "logit_scale"}
    scalars.update({
        "train/lr": applied_lr,
        "train/logit_scale": last["logit_scale"],
        "train/skipped_nonfinite": float(run.nonfinite.skipped),
        "perf/samples_per_s": speed["samples_per_s"],
        "perf/step_time_s": speed["step_time_s"],
        "perf/peak_memory_mb": speed["peak_memory_mb"],
    })
    if run.shapes is not None:
        scalars["perf/tflops_per_device"] = speed["tflops_per_device"]
    if run.shapes is not None and run.peak_tflops is not None:
        scalars["perf/mfu"] = speed["tflops_per_device"] / run.peak_tflops
    scalars.update({f"data/{reason}": float(count) for reason, count in counts.items()})
    return scalars


def _evaluate(run: Run, clocks: Clocks, monitor: Monitor, step: int) -> None:
    """Evaluation on a held-out synthetic world, reported at `step`; its time counts in no clock."""
    with clocks.paused():
        held_out = ShapesWorld(seed=run.config.data.world_seed, image_size=run.config.data.world_image_size)
        results, picture = evaluate_during_training(run.engine, run.model, run.tokenizer, run.normalization,
                                                    held_out, run.config.eval, run.image_dtype)
    monitor.scalars(step, results)
    monitor.image(step, "eval/dense_features", picture)


def _save(run: Run, clocks: Clocks, step: int) -> None:
    """Collective. A checkpoint of the engine, with what this loop needs to go on from `step` (`_trainer_state`)."""
    set_aside_after = None if run.saved else checkpoint.tag_for_step(run.start_step)
    checkpoint.save(run.engine, run.checkpoint_dir, step, _trainer_state(run, clocks, step), run.config.train.keep_last,
                    set_aside_after=set_aside_after)
    run.saved = True


def _trainer_state(run: Run, clocks: Clocks, step: int) -> dict[str, Any]:
    """Collective (the data counts are summed over ranks)."""
    return {"step": step, "config": run.config.to_dict(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "stream": run.stream.state_dict(), "world_size": run.world_size,
            "skipped_nonfinite": run.nonfinite.skipped,
            "data_counts": dict(_sum_counters_over_ranks(run.data_counts, run.world_size)),
            "run_totals": _run_totals(run, clocks).state_dict()}


def _run_totals(run: Run, clocks: Clocks) -> RunTotals:
    """Collective. The earlier starts' totals with this start's steps so far."""
    this_start = _device_figures_over_ranks(clocks.this_start.peek(), run.world_size, run.engine.device)
    return run.earlier_starts.plus(this_start, run.world_size)


def run_summary(run: Run, clocks: Clocks) -> dict[str, Any]:
    """Collective. The run's figures over all its starts, for summary.json."""
    summary = {**_run_totals(run, clocks).figures(), "device": device_name(), "world_size": run.world_size}
    # the run's data counts (samples, regions, every skip by reason), summed over ranks and starts
    summary["data"] = dict(sorted(_sum_counters_over_ranks(run.data_counts, run.world_size).items()))
    if run.shapes is None:
        del summary["tflops_per_device"]  # FLOPs of this tower are not modelled
    elif run.peak_tflops is not None:
        summary["mfu"] = summary["tflops_per_device"] / run.peak_tflops
    return summary
