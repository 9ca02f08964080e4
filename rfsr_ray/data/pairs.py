"""Turning decoded HR images into LR/HR training pairs (crops + degradation), batch by batch.

Pair schema (one row per pair; numpy batch format):
- `hr`: uint8 (P, P, 3) HR patch (USM-sharpened when configured), P = data.patch_size
- `lr`: uint8 (P/scale, P/scale, 3) degraded LR patch
- `source_id`: str, `crop_index`: int64, `epoch`: int64
- `crop_box`: int32 (4,) = [top, left, height, width] in the EXIF-oriented source image
- `degradation`: str, JSON of every sampled degradation parameter (plus flip / rot90)
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

import numpy as np

from rfsr_ray import seeds
from rfsr_ray.config import DataConfig, DegradationConfig
from rfsr_ray.data.decode import decode_image
from rfsr_ray.data.degradations import degrade

PAIR_COLUMNS = (
    "hr", "lr", "source_id", "crop_index", "epoch", "crop_box", "degradation", "caption"
)  # fmt: skip


def sample_rng(
    seed: int, source_id: str, crop_index: int, epoch: int, stream: int = 0
) -> np.random.Generator:
    """The generator of one pair: a pure function of its identity, identical on every machine.

    `stream` separates independent uses of the same identity (0: the pair, 1: the crop count).
    """
    digest = hashlib.sha256(source_id.encode()).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return seeds.numpy_rng(seed, "data", *words, crop_index, epoch, stream)


def num_crops(data: DataConfig, weight: float, source_id: str, epoch: int) -> int:
    """crops_per_image × source weight, stochastically rounded (seeded) so the mean is exact."""
    expected = data.crops_per_image * weight
    whole = int(np.floor(expected))
    rng = sample_rng(data.seed, source_id, 0, epoch, stream=1)
    return whole + int(rng.uniform() < expected - whole)


def random_crop(
    image: np.ndarray, patch_size: int, rng: np.random.Generator, flip: bool, rot90: bool
) -> tuple[np.ndarray, list[int], dict[str, Any]]:
    """Crop a (patch_size, patch_size, 3) patch; returns patch, [top, left, h, w], augmentations."""
    height, width = image.shape[:2]
    top = int(rng.integers(0, height - patch_size + 1))
    left = int(rng.integers(0, width - patch_size + 1))
    patch = image[top : top + patch_size, left : left + patch_size]
    augment = {
        "hflip": bool(flip and rng.uniform() < 0.5),
        "rot90": int(rng.integers(0, 4)) if rot90 else 0,
    }
    if augment["hflip"]:
        patch = patch[:, ::-1]
    patch = np.ascontiguousarray(np.rot90(patch, augment["rot90"]))
    return patch, [top, left, patch_size, patch_size], augment


def pad_to(image: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad an image whose sides are below `size` (used with data.pad_small)."""
    pad_h, pad_w = max(0, size - image.shape[0]), max(0, size - image.shape[1])
    mode = "reflect" if pad_h < image.shape[0] and pad_w < image.shape[1] else "edge"
    return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode=mode)


def pairs_from_image(
    image: np.ndarray,
    source_id: str,
    count: int,
    epoch: int,
    data: DataConfig,
    degradation: DegradationConfig,
) -> list[dict[str, Any]]:
    """`count` pairs from one decoded (H, W, 3) uint8 image."""
    if data.pad_small:
        image = pad_to(image, data.patch_size)
    pairs = []
    for crop_index in range(count):
        rng = sample_rng(data.seed, source_id, crop_index, epoch)
        patch, box, augment = random_crop(image, data.patch_size, rng, data.flip, data.rot90)
        hr, lr, params = degrade(patch, data.scale, degradation, rng)
        params.update(augment)
        pairs.append(
            {
                "hr": hr,
                "lr": lr,
                "source_id": source_id,
                "crop_index": crop_index,
                "epoch": epoch,
                "crop_box": np.asarray(box, dtype=np.int32),
                "degradation": json.dumps(params),
            }
        )
    return pairs


def empty_pair_batch(data: DataConfig) -> dict[str, np.ndarray]:
    size, low = data.patch_size, data.patch_size // data.scale
    return {
        "hr": np.zeros((0, size, size, 3), np.uint8),
        "lr": np.zeros((0, low, low, 3), np.uint8),
        "source_id": np.zeros(0, object),
        "crop_index": np.zeros(0, np.int64),
        "epoch": np.zeros(0, np.int64),
        "crop_box": np.zeros((0, 4), np.int32),
        "degradation": np.zeros(0, object),
        "caption": np.zeros(0, object),
    }


def make_pair_batch(
    batch: dict[str, np.ndarray], data: DataConfig, degradation: DegradationConfig
) -> tuple[dict[str, np.ndarray], Counter[str]]:
    """Decode a batch of `{source_id, image_bytes, weight, epoch}` rows into a batch of pairs.

    Returns the pair batch and the counts of every outcome (`decoded`, skip reasons,
    conversions, `pairs`).
    """
    counts: Counter[str] = Counter()
    rows: list[dict[str, Any]] = []
    min_size = 0 if data.pad_small else data.patch_size
    captions = batch.get("caption", [""] * len(batch["source_id"]))
    for source_id, data_bytes, weight, epoch, caption in zip(
        batch["source_id"],
        batch["image_bytes"],
        batch["weight"],
        batch["epoch"],
        captions,
        strict=True,
    ):
        decoded = decode_image(bytes(data_bytes or b""), min_size, data.max_pixels)
        counts.update(f"converted_{note}" for note in decoded.conversions)
        if decoded.image is None:
            counts[f"skipped_{decoded.skip}"] += 1
            continue
        counts["decoded"] += 1
        count = num_crops(data, float(weight), str(source_id), int(epoch))
        pairs = pairs_from_image(
            decoded.image, str(source_id), count, int(epoch), data, degradation
        )
        rows.extend({**pair, "caption": str(caption)} for pair in pairs)
    counts["pairs"] += len(rows)
    if not rows:
        return empty_pair_batch(data), counts
    out = {name: np.stack([row[name] for row in rows]) for name in ("hr", "lr", "crop_box")}
    for name in ("source_id", "degradation", "caption"):
        out[name] = np.asarray([row[name] for row in rows], dtype=object)
    for name in ("crop_index", "epoch"):
        out[name] = np.asarray([row[name] for row in rows], dtype=np.int64)
    return out, counts
