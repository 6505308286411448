"""How much room is left where a write failed: torch.save on a full disk says only 'unexpected pos 128 vs 0'."""
from __future__ import annotations

import shutil
from pathlib import Path


def free_space(folder: Path) -> str:
    """'<n> MiB free' on the file system holding `folder` (or its nearest existing parent), '' when unknown."""
    for existing in (folder, *folder.parents):
        try:
            return f"{shutil.disk_usage(existing).free / 2**20:.0f} MiB free there"
        except OSError:
            continue
    return ""
