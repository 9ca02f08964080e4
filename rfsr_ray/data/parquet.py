"""Materialised pair sets on disk: Parquet with PNG-encoded images, plus a preview grid.

Layout of a pair set directory `OUT/`:
- `OUT/pairs/*.parquet`: columns `hr_png`, `lr_png` (binary PNG), `source_id`, `crop_index`,
  `epoch`, `crop_box` (list<int32>[4]), `degradation` (JSON string). Plain
  `pyarrow.parquet.read_table("OUT/pairs")` reads it; `read_pair_dataset("OUT")` decodes it back to
  the streaming schema of `rfsr_ray.data.pairs`.
- `OUT/config.yaml` (resolved config), `OUT/stats.json` (outcome counts), `OUT/preview.png`.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow.parquet as pq
import ray.data
from PIL import Image

from rfsr_ray.config import RFSRConfig
from rfsr_ray.data.pipeline import PairPipeline, raise_if_empty
from rfsr_ray.errors import DataError
from rfsr_ray.images import image_grid


def _encode_png(image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", image[..., ::-1])
    if not ok:  # pragma: no cover
        raise RuntimeError(f"PNG encoding failed for shape {image.shape}")
    return buffer.tobytes()


def _decode_png(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]


def encode_pair_batch(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Pair batch (uint8 arrays) → storable batch (PNG bytes, list columns)."""
    return {
        "hr_png": [_encode_png(image) for image in batch["hr"]],
        "lr_png": [_encode_png(image) for image in batch["lr"]],
        "source_id": list(batch["source_id"]),
        "crop_index": batch["crop_index"],
        "epoch": batch["epoch"],
        "crop_box": [list(map(int, box)) for box in batch["crop_box"]],
        "degradation": list(batch["degradation"]),
        "caption": list(batch["caption"]),
    }


def decode_pair_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Storable batch → pair batch with uint8 `hr` / `lr` arrays."""
    return {
        "hr": np.stack([_decode_png(data) for data in batch["hr_png"]]),
        "lr": np.stack([_decode_png(data) for data in batch["lr_png"]]),
        "source_id": np.asarray(batch["source_id"], dtype=object),
        "crop_index": np.asarray(batch["crop_index"], dtype=np.int64),
        "epoch": np.asarray(batch["epoch"], dtype=np.int64),
        "crop_box": np.stack([np.asarray(box, np.int32) for box in batch["crop_box"]]),
        "degradation": np.asarray(batch["degradation"], dtype=object),
        # sets written before captions existed have none: the empty prompt
        "caption": np.asarray(batch.get("caption", [""] * len(batch["hr_png"])), dtype=object),
    }


def pairs_dir(path: str | Path) -> Path:
    return Path(path) / "pairs"


def read_pair_dataset(path: str | Path) -> ray.data.Dataset:
    """A pair set written by `write_pair_set`, as a Dataset in the streaming pair schema."""
    folder = pairs_dir(path)
    if not folder.is_dir():
        raise DataError(
            f"{str(path)!r} is not a pair set (no {folder}/); create one with "
            "`python pipelines/prepare_data.py --config … prepare.dir={path}`"
        )
    return ray.data.read_parquet(str(folder)).map_batches(decode_pair_batch, batch_format="numpy")


def write_pair_set(pipeline: PairPipeline, cfg: RFSRConfig) -> dict[str, int]:
    """Write the pipeline's pairs under `cfg.prepare.dir` atomically; returns the outcome counts.

    Everything is written to a hidden temporary sibling and renamed into place only when complete,
    so a crash never leaves a partial set under the final name. An existing set is replaced only
    with `prepare.overwrite: true`.
    """
    final = Path(cfg.prepare.dir)
    if final.exists() and not cfg.prepare.overwrite:
        raise DataError(
            f"output {str(final)!r} already exists; set prepare.overwrite=true to replace it "
            "or choose another prepare.dir"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        encoded = pipeline.dataset.map_batches(encode_pair_batch, batch_format="numpy")
        encoded.write_parquet(str(pairs_dir(staging)), row_group_size=cfg.prepare.row_group_size)
        counts = pipeline.counts()
        raise_if_empty(counts, "prepare_data")
        cfg.save(staging / "config.yaml")
        (staging / "stats.json").write_text(json.dumps(counts, indent=2, sort_keys=True))
        if cfg.prepare.preview_rows:
            write_preview(staging, staging / "preview.png", cfg.prepare.preview_rows)
        _replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return counts


def _replace(staging: Path, final: Path) -> None:
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(final)


def preview_grid(lr_images: list[np.ndarray], hr_images: list[np.ndarray]) -> np.ndarray:
    """Rows of [LR bicubic-upscaled | HR]: (H, W, 3) uint8."""
    rows = []
    for lr, hr in zip(lr_images, hr_images, strict=True):
        up = cv2.resize(lr, (hr.shape[1], hr.shape[0]), interpolation=cv2.INTER_CUBIC)
        rows.append([up, hr])
    return image_grid(rows)


def write_preview(pair_set: str | Path, out_path: str | Path, rows: int) -> Path:
    """Preview PNG of the first `rows` pairs of a pair set (read with plain pyarrow)."""
    table = pq.read_table(pairs_dir(pair_set), columns=["hr_png", "lr_png"]).slice(0, rows)
    hr = [_decode_png(data) for data in table.column("hr_png").to_pylist()]
    lr = [_decode_png(data) for data in table.column("lr_png").to_pylist()]
    Image.fromarray(preview_grid(lr, hr)).save(out_path)
    return Path(out_path)
