"""Where a run reports: TensorBoard scalars, a JSON-lines log, plain log lines and a tqdm bar (rank 0)."""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from fineclip_ds.files import write_atomically

log = logging.getLogger("fineclip_ds")


def _logged_step(line: str) -> int | None:
    """The step of one JSON line, or None for a line that a crash (node lost, disk full) cut off mid-write."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):  # json.JSONDecodeError is a ValueError
        return None


def _keep_steps_up_to(metrics: Path, last_step: int) -> None:
    """Rewrite the JSON-lines log (atomically) without the lines of steps after `last_step` and without a
    line cut off mid-write, which would otherwise stop every resume and glue the next line onto itself."""
    if not metrics.exists():
        return
    logged = metrics.read_text(errors="replace")  # a crash may leave stray bytes: that line is dropped
    kept = [line for line in logged.splitlines() if (step := _logged_step(line)) is not None and step <= last_step]
    rewritten = "".join(line + "\n" for line in kept)
    if rewritten != logged:
        write_atomically(metrics, rewritten)


class Monitor:
    """Logs are not the run: a write that fails (a full disk, the run folder moved) is reported once and training
    goes on, where it used to stop the run, losing the steps since its last checkpoint. Checkpoints, which are the
    run, stop it when they cannot be written."""

    def __init__(self, output_dir: Path, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self._writer = None
        self._bar = None
        self._jsonl = None
        self._failed_writes: set[str] = set()
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        output_dir.mkdir(parents=True, exist_ok=True)
        self._output_dir = output_dir
        # A run resumed at start_step logs steps start_step + 1 ... again: what an interrupted run logged
        # past its checkpoint is dropped, so each step appears once (TensorBoard: purge_step).
        self._writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)
        metrics = output_dir / "metrics.jsonl"
        _keep_steps_up_to(metrics, start_step)
        self._jsonl = metrics.open("a")
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def step(self, step: int, loss: float, samples_per_s: float | None) -> None:
        """Every step: the bar, and one JSON line (the loss curve that resume tests compare)."""
        if not self.enabled:
            return
        self._bar.update(1)
        postfix = {"loss": f"{loss:.4f}"}
        if samples_per_s is not None:
            postfix["samples/s"] = f"{samples_per_s:.1f}"
        self._bar.set_postfix(postfix)
        with self._logs_may_fail("metrics.jsonl"):
            self._jsonl.write(json.dumps({"step": step, "loss": loss}) + "\n")
            self._jsonl.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self._logs_may_fail("tensorboard/"):
            for name, value in values.items():
                self._writer.add_scalar(name, value, step)
            self._writer.flush()
        text = " ".join(f"{name}={value:.4g}" for name, value in sorted(values.items()))
        self._bar.write(f"step {step}: {text}")

    def image(self, step: int, tag: str, picture) -> None:
        """picture: [H, W, 3] uint8 array."""
        if not self.enabled:
            return
        with self._logs_may_fail("tensorboard/"):
            self._writer.add_image(tag, picture, step, dataformats="HWC")
            self._writer.flush()

    def summary(self, values: dict[str, float | str]) -> None:
        """End of run: printed, and written to summary.json beside the metrics."""
        if not self.enabled:
            return
        self._bar.write("run summary: " + " ".join(
            f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}" for name, value in values.items()))
        with self._logs_may_fail("summary.json"):
            write_atomically(self._output_dir / "summary.json", json.dumps(values, indent=2))

    def close(self) -> None:
        if not self.enabled:
            return
        self._bar.close()
        with self._logs_may_fail("tensorboard/"):
            self._writer.close()
        with self._logs_may_fail("metrics.jsonl"):
            self._jsonl.close()

    @contextlib.contextmanager
    def _logs_may_fail(self, name: str) -> Iterator[None]:
        """A failed write of `name` is said once, the first time, and not raised."""
        try:
            yield
        except OSError as error:
            if name not in self._failed_writes:
                self._failed_writes.add(name)
                log.error("cannot write %s in %s (%s): training goes on, without these logs until the run is "
                          "resumed; the checkpoints hold the run", name, self._output_dir, error)
