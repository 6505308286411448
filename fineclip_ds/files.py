"""Files a crash or a full disk cannot leave half written, and what to say when a write fails."""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

# What torch.load raises on a file that was cut short or overwritten (a full disk, a killed copy).
UNREADABLE_TORCH_FILE = (RuntimeError, EOFError, pickle.UnpicklingError)


def write_atomically(path: Path, text: str, writer: int | str = "") -> None:
    """`text` into `path` through a temporary file beside it and a rename: a reader (a rerun, a resume, evaluate)
    sees the old file or the new one, never a half-written one. Processes writing the same file pass their own
    `writer` (a rank: process ids repeat across nodes) so that each has its own temporary file."""
    partial = path.with_name(f"{path.name}{f'.{writer}' if writer != '' else ''}.tmp")
    try:
        partial.write_text(text)
        _flush_to_disk(partial)  # before the rename is: a crash must not leave `latest` renamed but empty
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise


def _flush_to_disk(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)  # Linux flushes a file's data through any descriptor of it
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def free_space(folder: Path) -> str:
    """'<n> MiB free there' on the file system holding `folder` (or its nearest existing parent):
    torch.save on a full disk says only 'unexpected pos 128 vs 0'."""
    for existing in (folder, *folder.parents):
        try:
            return f"{shutil.disk_usage(existing).free / 2**20:.0f} MiB free there"
        except OSError:
            continue
    return "free space unknown"
