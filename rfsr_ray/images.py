"""Small image helpers shared by previews, validation grids and inference."""

from __future__ import annotations

import numpy as np
import torch


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
    tensor = torch.as_tensor(images).to(device)  # uint8 over the bus, then float
    return tensor.permute(0, 3, 1, 2).float().div(255)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [0, 1] → uint8 (B, H, W, 3)."""
    return images.detach().clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
