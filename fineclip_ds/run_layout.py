"""Where a run keeps its checkpoints and logs. The trainer writes this layout; export, evaluation and config
validation find a run's weights by it (config cannot import the checkpoint code, which imports config)."""
from __future__ import annotations

import os
from pathlib import Path

LATEST = "latest"  # the file naming the newest complete tag


def checkpoints_folder(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def folders_that_may_hold_latest(path: Path) -> tuple[Path, Path, Path]:
    """Where `latest` is when `path` is a run's output folder, its checkpoints folder or one tag folder."""
    return checkpoints_folder(path), path, path.parent


def folder_with_latest(path: Path) -> Path | None:
    """The first of those holding `latest`, or None (the run has saved no checkpoint, or is not a run)."""
    return next((folder for folder in folders_that_may_hold_latest(path) if (folder / LATEST).is_file()), None)


RUN_LOGS = ("metrics.jsonl", "summary.json", "config.json", "tensorboard")  # what a start writes beside checkpoints/
EARLIER_START_PREFIX = "earlier_start_"


def set_aside_earlier_logs(output_dir: Path) -> Path | None:
    """A fresh start (nothing to resume) in a folder holding an earlier start's logs moves them into
    `earlier_start_<n>/` instead of replacing them: the earlier start may be a run whose checkpoints/ was moved
    away to keep it, or a job killed before its first save. Returns that folder, or None if there were none."""
    present = [output_dir / name for name in RUN_LOGS if (output_dir / name).exists()]
    if not present:
        return None
    number = 1
    while (output_dir / f"{EARLIER_START_PREFIX}{number}").exists():
        number += 1
    target = output_dir / f"{EARLIER_START_PREFIX}{number}"
    target.mkdir()
    for path in present:
        os.replace(path, target / path.name)
    return target
