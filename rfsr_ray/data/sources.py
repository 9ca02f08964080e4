"""Sources of HR images as Ray Datasets of `{source_id, image_bytes, weight}` rows.

`source_id` is stable across machines (a path relative to the source root, a Parquet id column or
content hash, or `builtin:NAME`): together with the seed it fixes every random draw of a pair.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
import pyarrow as pa
import ray.data
from PIL import Image

from rfsr_ray.config import SourceConfig
from rfsr_ray.errors import DataError

IMAGE_EXTENSIONS = ["png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff"]
# Natural colour photographs that ship inside scikit-image (no download needed).
BUILTIN_IMAGES = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina",
    "immunohistochemistry",
)  # fmt: skip


def builtin_image(name: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB image from `skimage.data`."""
    if name not in BUILTIN_IMAGES:
        raise DataError(
            f"builtin image {name!r} is unknown; choose from {', '.join(BUILTIN_IMAGES)}"
        )
    import skimage.data  # imported lazily: it is slow and only the builtin source needs it

    return getattr(skimage.data, name)()


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _builtin_source(source: SourceConfig) -> ray.data.Dataset:
    names = source.names or BUILTIN_IMAGES
    rows = [
        {
            "source_id": f"builtin:{name}",
            "image_bytes": _png_bytes(builtin_image(name)),
            "weight": source.weight,
            "caption": "",
        }
        for name in names
    ]
    return ray.data.from_items(rows)


def _relative_id(path: str, root: str) -> str:
    root = root.split("://", 1)[-1].rstrip("/")
    path = path.split("://", 1)[-1]
    if path.startswith(root + "/"):
        return path[len(root) + 1 :]
    return path if path != root else path.rsplit("/", 1)[-1]


def _sidecar_caption(image_path: str, extension: str | None) -> str:
    """The text of `image.EXT`'s sidecar `image{extension}`, or '' when there is none."""
    if extension is None:
        return ""
    import fsspec

    path = image_path.rsplit(".", 1)[0] + extension
    try:
        with fsspec.open(path, "r", encoding="utf-8") as handle:
            return handle.read().strip()
    except FileNotFoundError:
        return ""


def _folder_source(source: SourceConfig) -> ray.data.Dataset:
    root = str(source.path)
    try:
        dataset = ray.data.read_binary_files(
            root, include_paths=True, file_extensions=IMAGE_EXTENSIONS
        )
    except (FileNotFoundError, OSError, ValueError) as error:
        raise DataError(
            f"image source {root!r} cannot be read ({type(error).__name__}: {error}); "
            f"give an existing folder or URI holding {'/'.join(IMAGE_EXTENSIONS)} files"
        ) from None
    weight, extension = source.weight, source.caption_extension

    def to_rows(batch: dict[str, np.ndarray]) -> dict[str, Any]:
        ids = [_relative_id(str(path), root) for path in batch["path"]]
        captions = [_sidecar_caption(str(p), extension) for p in batch["path"]]
        return {
            "source_id": np.asarray(ids, dtype=object),
            "image_bytes": batch["bytes"],
            "weight": np.full(len(ids), weight),
            "caption": np.asarray(captions, dtype=object),
        }

    return dataset.map_batches(to_rows, batch_format="numpy")


def _parquet_source(source: SourceConfig) -> ray.data.Dataset:
    path, column, id_column = str(source.path), source.image_column, source.id_column
    try:
        dataset = ray.data.read_parquet(path)
        names = dataset.schema().names
    except (FileNotFoundError, OSError, ValueError, pa.ArrowInvalid) as error:
        raise DataError(f"Parquet source {path!r} cannot be read: {error}") from None
    caption_column = source.caption_column
    for needed in (column, id_column, caption_column):
        if needed is not None and needed not in names:
            raise DataError(
                f"Parquet source {path!r} has no column {needed!r} (columns: {names}); "
                f"set image_column / id_column / caption_column in the source config"
            )
    weight = source.weight

    def to_rows(batch: dict[str, np.ndarray]) -> dict[str, Any]:
        images = batch[column]
        if id_column is not None:
            ids = [f"{path}#{value}" for value in batch[id_column]]
        else:  # content hash: stable wherever the file is copied
            ids = [hashlib.sha1(bytes(data or b"")).hexdigest() for data in images]
        captions = [""] * len(ids)
        if caption_column is not None:
            captions = ["" if text is None else str(text) for text in batch[caption_column]]
        return {
            "source_id": np.asarray(ids, dtype=object),
            "image_bytes": images,
            "weight": np.full(len(ids), weight),
            "caption": np.asarray(captions, dtype=object),
        }

    return dataset.map_batches(to_rows, batch_format="numpy")


def read_source(source: SourceConfig) -> ray.data.Dataset:
    """One source as a Dataset of `{source_id, image_bytes, weight, caption}` ('' = none)."""
    match source.kind:
        case "builtin":
            return _builtin_source(source)
        case "folder":
            return _folder_source(source)
        case "parquet":
            return _parquet_source(source)
    raise AssertionError(source.kind)  # unreachable: the config schema limits `kind`


def read_sources(sources: tuple[SourceConfig, ...]) -> ray.data.Dataset:
    """All sources mixed into one Dataset."""
    datasets = [read_source(source) for source in sources]
    return datasets[0] if len(datasets) == 1 else datasets[0].union(*datasets[1:])
