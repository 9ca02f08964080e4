"""Super-resolution of whole images: padding to the UNet's multiple, tiled sampling with overlap
blending for images larger than the model's native size, colour fixes, and the Ray Data actor
that runs one model."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from rfsr_ray.images import to_tensor, to_uint8
from rfsr_ray.models import ISRDiffusionModel, load_model
from rfsr_ray.train.checkpoint import COMPLETE_MARKER, model_from_checkpoint

PAD_MULTIPLE = 16  # UNet down-sampling needs sides divisible by 2^depth
ColorFix = Literal["none", "adain", "wavelet"]


def load_any(path: Path) -> ISRDiffusionModel:
    """An exported model folder or a training checkpoint folder."""
    if (path / COMPLETE_MARKER).is_file():
        return model_from_checkpoint(path)
    return load_model(path)


def image_seed(seed: int, *names: str) -> int:
    """A seed from the image's identity: the same output whichever actor handles the image."""
    digest = hashlib.sha256("/".join([str(seed), *names]).encode()).digest()
    return int.from_bytes(digest[:7], "little")


def super_resolve(model: ISRDiffusionModel, image: np.ndarray, steps: int, seed: int) -> np.ndarray:
    """uint8 (h, w, 3) → uint8 (h·s, w·s, 3); reflect-pads to the UNet's multiple, then crops."""
    return to_uint8(_sample_padded(model, image, steps, seed))[0]


def _sample_padded(
    model: ISRDiffusionModel, image: np.ndarray, steps: int, seed: int
) -> torch.Tensor:
    height, width = image.shape[:2]
    pad_h, pad_w = -height % PAD_MULTIPLE, -width % PAD_MULTIPLE
    mode = "reflect" if pad_h < height and pad_w < width else "edge"
    padded = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode=mode)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sr = model.sample(to_tensor(padded[None], model_device(model)), steps, generator)
    return sr[..., : height * model.scale, : width * model.scale].float().cpu()


def model_device(model: ISRDiffusionModel) -> torch.device:
    return getattr(model, "device", torch.device("cpu"))


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering [0, length): stride tile − overlap, the last flush with the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    return [*starts, length - tile]


def _ramp(length: int, overlap: int) -> np.ndarray:
    """Blending weight along one tile side: linear ramps over the overlaps, 1 inside."""
    weight = np.ones(length, np.float32)
    if overlap > 0:
        ramp = (np.arange(overlap, dtype=np.float32) + 1) / (overlap + 1)
        weight[:overlap] = ramp
        weight[-overlap:] = ramp[::-1]
    return weight


def tiled_super_resolve(
    model: ISRDiffusionModel, image: np.ndarray, steps: int, seed: int, tile: int, overlap: int
) -> np.ndarray:
    """Super-resolve an LR image larger than `tile` in overlapping tiles, blended with linear
    ramps in the overlaps (weights normalised, so flat regions stay exact). Each tile is sampled
    with its own seed derived from `seed` and its position. uint8 in, uint8 out."""
    height, width = image.shape[:2]
    if height <= tile and width <= tile:
        return super_resolve(model, image, steps, seed)
    scale = model.scale
    total = np.zeros((height * scale, width * scale, 3), np.float64)
    weights = np.zeros((height * scale, width * scale, 1), np.float64)
    for top in tile_starts(height, tile, overlap):
        for left in tile_starts(width, tile, overlap):
            patch = image[top : top + tile, left : left + tile]
            sr = _sample_padded(model, patch, steps, image_seed(seed, str(top), str(left)))
            sr = sr[0].permute(1, 2, 0).numpy()
            ramp_h = _ramp(sr.shape[0], overlap * scale if top or height > tile else 0)
            ramp_w = _ramp(sr.shape[1], overlap * scale if left or width > tile else 0)
            weight = (ramp_h[:, None] * ramp_w[None, :])[..., None]
            rows = slice(top * scale, top * scale + sr.shape[0])
            cols = slice(left * scale, left * scale + sr.shape[1])
            total[rows, cols] += sr * weight
            weights[rows, cols] += weight
    return np.clip(np.round(total / weights * 255.0), 0, 255).astype(np.uint8)


def adain_color_fix(sr: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Match each channel's mean and std of `sr` to `reference` (both (B, 3, H, W) in [0, 1]),
    as StableSR's AdaIN colour fix does."""
    sr_mean, sr_std = sr.mean((-2, -1), keepdim=True), sr.std((-2, -1), keepdim=True)
    ref_mean, ref_std = (
        reference.mean((-2, -1), keepdim=True),
        reference.std((-2, -1), keepdim=True),
    )
    return ((sr - sr_mean) / (sr_std + 1e-6) * ref_std + ref_mean).clamp(0, 1)


def _wavelet_split(image: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) by StableSR's à-trous decomposition: repeated 3×3 binomial blurs with dilation
    2^i. Written here because it is not a DWT (pytorch_wavelets has no à-trous transform)."""
    kernel = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=image.dtype) / 16
    kernel = kernel.to(image.device).expand(3, 1, 3, 3)
    high = torch.zeros_like(image)
    low = image
    for level in range(levels):
        radius = 2**level
        padded = F.pad(low, (radius,) * 4, mode="replicate")
        blurred = F.conv2d(padded, kernel, groups=3, dilation=radius)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_color_fix(sr: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """High frequencies of `sr` on the low frequencies (colour, shading) of `reference`."""
    high, _ = _wavelet_split(sr)
    _, low = _wavelet_split(reference)
    return (high + low).clamp(0, 1)


def color_fix(sr: np.ndarray, lr: np.ndarray, mode: ColorFix) -> np.ndarray:
    """Apply a colour fix against the bicubic-upsampled LR image; uint8 in, uint8 out."""
    if mode == "none":
        return sr
    sr_t = to_tensor(sr[None])
    reference = F.interpolate(to_tensor(lr[None]), size=sr.shape[:2], mode="bicubic").clamp(0, 1)
    fixed = (
        adain_color_fix(sr_t, reference) if mode == "adain" else wavelet_color_fix(sr_t, reference)
    )
    return to_uint8(fixed)[0]


class Upscaler:
    """Ray Data actor: one model, loaded once; adds `model` and `sr_png` to each row."""

    def __init__(
        self,
        name: str,
        path: str,
        steps: int,
        seed: int,
        tile: int,
        overlap: int,
        fix: ColorFix,
        save_dir: str | None,
    ) -> None:
        self.name, self.seed, self.tile, self.overlap, self.fix = name, seed, tile, overlap, fix
        self.model = load_any(Path(path))
        if torch.cuda.is_available():
            self.model.to(torch.device("cuda"))
        self.steps = steps
        self.save_dir = Path(save_dir) if save_dir else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from rfsr_ray.eval.testsets import decode_png, png_bytes

        outputs = []
        for test_set, image_id, lr_png in zip(
            batch["set"], batch["image_id"], batch["lr_png"], strict=True
        ):
            lr = decode_png(lr_png)
            seed = image_seed(self.seed, str(test_set), str(image_id))
            sr = tiled_super_resolve(self.model, lr, self.steps, seed, self.tile, self.overlap)
            sr = color_fix(sr, lr, self.fix)
            encoded = png_bytes(sr)
            if self.save_dir is not None:
                target = self.save_dir / self.name / str(test_set) / f"{image_id}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(encoded)
            outputs.append(encoded)
        return {
            **batch,
            "model": np.full(len(outputs), self.name, dtype=object),
            "sr_png": np.asarray(outputs, dtype=object),
        }
