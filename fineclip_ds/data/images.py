"""Opening images that may be missing, truncated or not images at all: None instead of an exception."""
from __future__ import annotations

from typing import Callable

from PIL import Image


def open_image(opener: Callable[[], Image.Image]) -> Image.Image | None:
    """Run `opener` and decode fully (PIL decodes lazily); None when that fails, for the caller to count."""
    try:
        image = opener()
        image.load()
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for bad files
        return None
    return image
