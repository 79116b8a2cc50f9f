"""Pixel conversions that both stages need (prepare's thumbnails, the loader's decode)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float images (common for CT/MR exports) stretched min-max to 8-bit grayscale;
    PIL's own conversion would clip everything above 255 to white."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    pixels = np.asarray(image, dtype=np.float32)
    low, high = float(pixels.min()), float(pixels.max())
    scaled = (pixels - low) * (255 / (high - low)) if high > low else pixels * 0
    return Image.fromarray(scaled.round().astype(np.uint8), "L")
