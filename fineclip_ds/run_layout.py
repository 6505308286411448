"""Where a run keeps its checkpoints. The trainer writes this layout; export, evaluation and config
validation find a run's weights by it (config cannot import the checkpoint code, which imports config)."""
from __future__ import annotations

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
