"""Opening images that may be missing, truncated or not images at all: None instead of an exception;
and turning any mode PIL opens into the RGB the models see."""
from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image


def open_image(opener: Callable[[], Image.Image]) -> Image.Image | None:
    """Run `opener` and decode fully (PIL decodes lazily); None when that fails, for the caller to count."""
    try:
        image = opener()
        image.load()
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for bad files
        return None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB. PIL's own convert clips 16-bit grey (a 16-bit PNG opens as "I;16", or "I" in
    older Pillow) at 255 instead of scaling it, which turns almost every pixel white; it is scaled here."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        grey = np.clip(np.asarray(image).astype(np.int64), 0, 65535) >> 8
        image = Image.fromarray(grey.astype(np.uint8))  # 2-D uint8: mode "L"
    return image.convert("RGB")
