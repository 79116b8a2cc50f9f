"""Image opening and pixel conversions that both stages need (prepare's thumbnails, the loader's
decode)."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image


def open_image(data: bytes) -> Image.Image:
    """PIL's lazy open (header only), refusing an image of more than `Image.MAX_IMAGE_PIXELS`
    pixels: a few bytes of PNG can declare gigapixels (a decompression bomb). PIL only warns
    between 1x and 2x its limit; here both are errors, without touching the process's filters."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            raise ValueError(
                f"more pixels than PIL's Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}, "
                f"refused as a possible decompression bomb ({err})"
            ) from None


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float images (common for CT/MR exports) stretched min-max to 8-bit grayscale;
    PIL's own conversion would clip everything above 255 to white."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    pixels = np.asarray(image, dtype=np.float32)
    low, high = float(pixels.min()), float(pixels.max())
    scaled = (pixels - low) * (255 / (high - low)) if high > low else pixels * 0
    return Image.fromarray(scaled.round().astype(np.uint8), "L")
