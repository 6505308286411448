"""One reading of image and patch sizes, which open_clip configs give as one int (square) or two."""
from __future__ import annotations

from collections.abc import Sequence


def height_width(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of a size given as one int or as [height, width]."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return height, width
