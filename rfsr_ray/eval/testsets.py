"""Test sets as Ray Datasets of PNG-encoded LR/HR pairs.

Every row: `set`, `image_id`, `lr_png`, `hr_png` (b"" for LR-only sets) and `skip` (a reason from
the data pipeline's list, or "unpaired"; "" when the row is usable). Bad files stay in the stream
as rows with a reason, so they are counted and reported, never silently lost.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import ray
from PIL import Image

from rfsr_ray.config import DegradationConfig, TestSetConfig
from rfsr_ray.data.decode import decode_image
from rfsr_ray.data.degradations import degrade
from rfsr_ray.data.pairs import sample_rng
from rfsr_ray.data.parquet import pairs_dir
from rfsr_ray.data.sources import IMAGE_EXTENSIONS, read_source
from rfsr_ray.errors import DataError

UNPAIRED = "unpaired"
MAX_PIXELS = 64_000_000
# Paired test sets name the same scene differently on each side: RealSR `Canon_001_LR4.png` /
# `Canon_001_HR.png`, DIV2K `0801x4.png` / `0801.png`. This suffix is dropped before matching.
_SIDE_SUFFIX = re.compile(r"([_-]?(lr|hr)\d*|x\d)$", re.IGNORECASE)


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))  # writable, for torch


def _image_files(folder: str, what: str) -> dict[str, Path]:
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{what}={folder!r} is not a folder; give the folder of the test images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    keyed: dict[str, Path] = {}
    for path in files:
        relative = path.relative_to(root).with_suffix("")
        keyed[str(relative.with_name(_SIDE_SUFFIX.sub("", relative.name)))] = path
    return keyed


def _entries(test_set: TestSetConfig) -> list[dict[str, Any]]:
    """(id, lr path, hr path) of a folder test set; a file without its counterpart is kept as an
    `unpaired` row."""
    lr_files = _image_files(test_set.lr or "", f"test set {test_set.name}: lr")
    hr_files = _image_files(test_set.hr, f"test set {test_set.name}: hr") if test_set.hr else None
    keys = sorted(set(lr_files) | set(hr_files or {}))
    return [
        {
            "set": test_set.name,
            "image_id": key,
            "lr_path": str(lr_files.get(key, "")),
            "hr_path": "" if hr_files is None else str(hr_files.get(key, "")),
            "paired": hr_files is not None,
        }
        for key in keys
    ]


def _load_folder_rows(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, list[Any]] = {"lr_png": [], "hr_png": [], "skip": []}
    for lr_path, hr_path, paired in zip(
        batch["lr_path"], batch["hr_path"], batch["paired"], strict=True
    ):
        if not lr_path or (paired and not hr_path):
            out["lr_png"].append(b"")
            out["hr_png"].append(b"")
            out["skip"].append(UNPAIRED)
            continue
        images, skip = [], ""
        for path in (lr_path, hr_path) if paired else (lr_path,):
            decoded = decode_image(Path(path).read_bytes(), min_size=1, max_pixels=MAX_PIXELS)
            skip = skip or (decoded.skip or "")
            images.append(decoded.image)
        ok = not skip
        out["lr_png"].append(png_bytes(images[0]) if ok else b"")
        out["hr_png"].append(png_bytes(images[1]) if ok and paired else b"")
        out["skip"].append(skip)
    return {
        "set": batch["set"],
        "image_id": batch["image_id"],
        **{key: np.asarray(values, dtype=object) for key, values in out.items()},
    }


def _parquet_rows(test_set: TestSetConfig) -> ray.data.Dataset:
    name = test_set.name

    def to_rows(batch: dict[str, np.ndarray]) -> dict[str, Any]:
        ids = [f"{s}#{c}" for s, c in zip(batch["source_id"], batch["crop_index"], strict=True)]
        return {
            "set": np.full(len(ids), name, dtype=object),
            "image_id": np.asarray(ids, dtype=object),
            "lr_png": batch["lr_png"],
            "hr_png": batch["hr_png"],
            "skip": np.full(len(ids), "", dtype=object),
        }

    folder = pairs_dir(test_set.path or "")
    if not folder.is_dir():
        raise DataError(
            f"test set {name}: {test_set.path!r} is not a pair set (no pairs/ folder); make one "
            "with pipelines/prepare_data.py"
        )
    return ray.data.read_parquet(str(folder)).map_batches(to_rows, batch_format="numpy")


def _synthetic_rows(test_set: TestSetConfig, scale: int, seed: int) -> ray.data.Dataset:
    """HR images (centre-cropped to `crop`, trimmed to a multiple of the scale) degraded with
    the named preset; the randomness of each pair is seeded by (eval.seed, image id)."""
    name, crop = test_set.name, test_set.crop
    degradation = DegradationConfig(preset=test_set.degradation)

    def to_rows(batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, list[Any]] = {"lr_png": [], "hr_png": [], "skip": []}
        for source_id, data in zip(batch["source_id"], batch["image_bytes"], strict=True):
            decoded = decode_image(bytes(data or b""), min_size=scale, max_pixels=MAX_PIXELS)
            if decoded.image is None:
                out["lr_png"].append(b"")
                out["hr_png"].append(b"")
                out["skip"].append(decoded.skip)
                continue
            hr = _centre_crop(decoded.image, crop, scale)
            hr, lr, _ = degrade(hr, scale, degradation, sample_rng(seed, source_id, 0, 0))
            out["lr_png"].append(png_bytes(lr))
            out["hr_png"].append(png_bytes(hr))
            out["skip"].append("")
        return {
            "set": np.full(len(batch["source_id"]), name, dtype=object),
            "image_id": np.asarray(batch["source_id"], dtype=object),
            **{key: np.asarray(values, dtype=object) for key, values in out.items()},
        }

    assert test_set.source is not None  # the schema requires it for synthetic sets
    return read_source(test_set.source).map_batches(to_rows, batch_format="numpy", batch_size=4)


def _centre_crop(image: np.ndarray, crop: int | None, scale: int) -> np.ndarray:
    height, width = image.shape[:2]
    target_h, target_w = (min(crop, height), min(crop, width)) if crop else (height, width)
    target_h, target_w = target_h - target_h % scale, target_w - target_w % scale
    top, left = (height - target_h) // 2, (width - target_w) // 2
    return image[top : top + target_h, left : left + target_w]


def read_test_set(test_set: TestSetConfig, scale: int, seed: int) -> ray.data.Dataset:
    match test_set.kind:
        case "parquet":
            dataset = _parquet_rows(test_set)
        case "synthetic":
            dataset = _synthetic_rows(test_set, scale, seed)
        case _:
            entries = _entries(test_set)
            if not entries:
                raise DataError(f"test set {test_set.name}: no images found in {test_set.lr!r}")
            dataset = ray.data.from_items(entries).map_batches(
                _load_folder_rows, batch_format="numpy", batch_size=8
            )
    if test_set.limit is not None:
        dataset = dataset.sort("image_id").limit(test_set.limit)
    return dataset
