"""Small image helpers shared by previews, validation grids and inference."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

# Pillow's scalable default font (Aileron) has no glyphs for these; they would draw as boxes.
_ASCII_FOR = str.maketrans({"→": "->", "−": "-", "×": "x", "²": "^2", "Δ": "d"})


def image_grid(rows: list[list[np.ndarray]], gutter: int = 4) -> np.ndarray:
    """Tile equally tall (H, W, 3) uint8 panels: one list per row, white gutters between."""
    lines = []
    for panels in rows:
        spacer = np.full((panels[0].shape[0], gutter, 3), 255, np.uint8)
        pieces = [piece for panel in panels for piece in (panel, spacer)][:-1]
        lines.append(np.concatenate(pieces, axis=1))
    width = max(line.shape[1] for line in lines)
    padded = [
        np.pad(line, ((0, 0), (0, width - line.shape[1]), (0, 0)), constant_values=255)
        for line in lines
    ]
    spacer = np.full((gutter, width, 3), 255, np.uint8)
    stacked = [piece for line in padded for piece in (line, spacer)][:-1]
    return np.concatenate(stacked, axis=0)


def to_tensor(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (B, H, W, 3) → float (B, 3, H, W) in [0, 1]."""
    if not images.flags.writeable:  # Ray hands out read-only buffers; torch warns on sharing them
        images = images.copy()
    tensor = torch.as_tensor(images).to(device)  # uint8 over the bus, then float
    return tensor.permute(0, 3, 1, 2).float().div(255)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [0, 1] → uint8 (B, H, W, 3)."""
    return images.detach().clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def bicubic_upscale(lr_image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic upsampling to `size` = (H, W), clamped: (B, 3, h, w) → (B, 3, H, W) in [0, 1]."""
    return F.interpolate(lr_image, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central `size` × `size` region of an (H, W, ...) array (whole sides shorter than it)."""
    height, width = image.shape[:2]
    top, left = max(0, (height - size) // 2), max(0, (width - size) // 2)
    return image[top : top + size, left : left + size]


def upscale_nearest(panel: np.ndarray, min_size: int) -> np.ndarray:
    """Enlarge an (H, W, 3) panel by the smallest integer factor that makes its longer side at
    least `min_size` px, repeating pixels (nearest neighbour: no interpolation to mislead the
    eye); panels already that large come back unchanged."""
    factor = max(1, math.ceil(min_size / max(panel.shape[:2])))
    return panel.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else panel


def labelled_grid(
    rows: Sequence[Sequence[np.ndarray]],
    column_labels: Sequence[str],
    row_captions: Sequence[str] | None = None,
    title: str | None = None,
    min_panel: int = 128,
    font_size: int | None = None,
    gutter: int = 4,
) -> np.ndarray:
    """A readable grid of (H, W, 3) uint8 panels on white, as (H', W', 3) uint8: an optional
    `title` line, a header naming each column, then each row of panels with its caption under it.

    Panels whose longer side is under `min_panel` px are enlarged by nearest neighbour
    (`upscale_nearest`). Text uses Pillow's scalable default font, `font_size` px (default: 14,
    or a sixteenth of the widest panel when larger); characters it lacks (→ − × ² Δ) are drawn
    as ASCII. Captions may span lines ("\n").
    """
    if any(len(panels) != len(column_labels) for panels in rows):
        raise ValueError(
            f"every row needs one panel per column label ({len(column_labels)}), got rows of "
            f"{sorted({len(panels) for panels in rows})} panels"
        )
    if row_captions is not None and len(row_captions) != len(rows):
        raise ValueError(f"{len(row_captions)} row captions for {len(rows)} rows; give one each")
    shown = [[upscale_nearest(panel, min_panel) for panel in panels] for panels in rows]
    widths = [max(panels[col].shape[1] for panels in shown) for col in range(len(column_labels))]
    lefts = [gutter + sum(widths[:col]) + gutter * col for col in range(len(widths))]
    font = ImageFont.load_default(size=font_size or max(14, max(widths) // 16))
    labels = [_ascii(label) for label in column_labels]
    captions = [_ascii(caption) for caption in row_captions or [""] * len(rows)]
    texts = [_ascii(title or ""), *captions]
    width = max(lefts[-1] + widths[-1], *(gutter + _text_width(font, t) for t in texts)) + gutter
    bands = [_text_band([(_ascii(title), gutter)], width, font, gutter)] if title else []
    centred = [
        left + max(0, (column_width - _text_width(font, label)) // 2)
        for label, left, column_width in zip(labels, lefts, widths, strict=True)
    ]
    bands.append(_text_band(list(zip(labels, centred, strict=True)), width, font, gutter))
    for panels, caption in zip(shown, captions, strict=True):
        bands.append(_panel_band(panels, lefts, width, gutter))
        if caption:
            bands.append(_text_band([(caption, gutter)], width, font, gutter))
    bands.append(np.full((gutter, width, 3), 255, np.uint8))
    return np.concatenate(bands, axis=0)


def _panel_band(
    panels: Sequence[np.ndarray], lefts: Sequence[int], width: int, gutter: int
) -> np.ndarray:
    """A white band holding `panels` at x = `lefts`, top-aligned, a gutter below."""
    band = np.full((max(p.shape[0] for p in panels) + gutter, width, 3), 255, np.uint8)
    for panel, left in zip(panels, lefts, strict=True):
        band[: panel.shape[0], left : left + panel.shape[1]] = panel
    return band


def _text_band(
    pieces: Sequence[tuple[str, int]], width: int, font: ImageFont.FreeTypeFont, gutter: int
) -> np.ndarray:
    """A white band holding each (text, x) piece in black, as tall as its tallest text."""
    ascent, descent = font.getmetrics()
    line = font.getbbox("A")[3] + gutter  # Pillow's multiline line pitch for this spacing
    lines = max(text.count("\n") for text, _ in pieces)
    band = Image.new("RGB", (width, lines * line + ascent + descent + gutter), "white")
    draw = ImageDraw.Draw(band)
    for text, left in pieces:
        draw.multiline_text((left, 0), text, fill="black", font=font, spacing=gutter)
    return np.asarray(band)


def _ascii(text: str) -> str:
    return text.translate(_ASCII_FOR)


def _text_width(font: ImageFont.FreeTypeFont, text: str) -> int:
    return math.ceil(max((font.getlength(part) for part in text.split("\n")), default=0.0))
