"""Robust decoding of HR image bytes into uint8 RGB arrays, with every outcome named.

Pillow handles the formats; this module turns every odd-but-valid image into plain 8-bit RGB and
every unusable one into a skip reason instead of an exception, so one bad file never stops a run.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Skip reasons (a run fails listing these counts if every input is skipped).
EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
CORRUPT = "corrupt"
TOO_SMALL = "too_small"
TOO_LARGE = "too_large"
SKIP_REASONS = (EMPTY_FILE, NOT_AN_IMAGE, CORRUPT, TOO_SMALL, TOO_LARGE)


@dataclass(frozen=True)
class Decoded:
    """Result of decoding one file: `image` (H, W, 3) uint8 RGB, or None with `skip` set."""

    image: np.ndarray | None
    skip: str | None = None
    conversions: tuple[str, ...] = field(default_factory=tuple)


def _to_rgb(image: Image.Image) -> tuple[Image.Image, list[str]]:
    notes: list[str] = []
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        notes.append("high_bit_depth")
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "P":
        notes.append("palette")
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        notes.append("alpha_on_white")
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode == "CMYK":
        notes.append("cmyk")
    elif image.mode in ("L", "1"):
        notes.append("grayscale")
    return image.convert("RGB"), notes


def decode_image(data: bytes, min_size: int, max_pixels: int) -> Decoded:
    """Decode image bytes into (H, W, 3) uint8 RGB with EXIF orientation applied.

    Images with a side below `min_size` (0 disables) or more than `max_pixels` pixels are skipped;
    the pixel check happens on the header, before any pixel is decoded (decompression bombs).
    """
    if not data:
        return Decoded(None, EMPTY_FILE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                return Decoded(None, TOO_LARGE)
            # Pillow reads 16-bit RGB as 8-bit RGB (top byte); the raw mode is the only trace.
            wide = any(";16" in str(tile.args) for tile in image.tile)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return Decoded(None, TOO_LARGE)
    except UnidentifiedImageError:
        return Decoded(None, NOT_AN_IMAGE)
    except (OSError, ValueError, SyntaxError, EOFError):
        return Decoded(None, CORRUPT)
    notes: list[str] = ["high_bit_depth"] if wide else []
    transposed = ImageOps.exif_transpose(image)
    if transposed.size != image.size or image.getexif().get(0x0112, 1) != 1:
        notes.append("exif_oriented")
    rgb, conversions = _to_rgb(transposed)
    notes.extend(note for note in conversions if note not in notes)
    if min(rgb.size) < min_size:
        return Decoded(None, TOO_SMALL, tuple(notes))
    return Decoded(np.asarray(rgb, dtype=np.uint8), None, tuple(notes))
