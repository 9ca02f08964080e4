"""pyiqa metrics for evaluation: which ones can be built here (weights present), and the Ray Data
actor that scores SR outputs. Metrics are computed on the 8-bit SR image, exactly as written to
PNG, so the values equal pyiqa called directly on the saved files."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rfsr_ray import iqa
from rfsr_ray.errors import ConfigError, WeightsError
from rfsr_ray.images import to_tensor, to_uint8


@dataclass(frozen=True)
class MetricInfo:
    name: str
    full_reference: bool
    lower_better: bool


def resolve_metrics(names: tuple[str, ...]) -> tuple[list[MetricInfo], dict[str, str]]:
    """The metrics that can be built here, and {name: why not} for the others. An unknown
    name is a config error; missing weights (no network, nothing staged) only skip the metric."""
    import pyiqa

    known = set(pyiqa.list_models())
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(
            f"eval.metrics: {unknown} are not pyiqa metrics; see pyiqa.list_models(), "
            "e.g. psnr, ssim, lpips, niqe, musiq"
        )
    usable, skipped = [], {}
    for name in names:
        try:
            metric = iqa.create_metric(name)
        except WeightsError as error:  # missing weights (no network, nothing staged)
            skipped[name] = str(error).removeprefix(f"pyiqa metric {name!r} ")
            continue
        usable.append(MetricInfo(name, metric.metric_mode == "FR", bool(metric.lower_better)))
    return usable, skipped


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))  # writable, for torch


def centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    height, width = image.shape[:2]
    top, left = max(0, (height - size) // 2), max(0, (width - size) // 2)
    return image[top : top + size, left : left + size]


class Scorer:
    """Ray Data actor: scores each row's `sr_png` (against `hr_png` for full-reference metrics
    when the set has HR) and keeps centre crops for the report. Drops the full-size images."""

    def __init__(self, metrics: list[MetricInfo], crop: int) -> None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.metrics = [(info, iqa.create_metric(info.name, device)) for info in metrics]
        self.device, self.crop = device, crop

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from rfsr_ray.eval.testsets import png_bytes

        columns: dict[str, list[Any]] = {info.name: [] for info, _ in self.metrics}
        crops: dict[str, list[bytes]] = {"crop_lr_up": [], "crop_sr": [], "crop_hr": []}
        for sr_png, hr_png, lr_png in zip(
            batch["sr_png"], batch["hr_png"], batch["lr_png"], strict=True
        ):
            sr = _decode(sr_png)
            hr = _decode(hr_png) if len(hr_png) else None
            sr_t = to_tensor(sr[None], self.device)
            hr_t = to_tensor(hr[None], self.device) if hr is not None else None
            for info, metric in self.metrics:
                if info.full_reference and hr_t is None:
                    columns[info.name].append(math.nan)
                else:
                    args = (sr_t, hr_t) if info.full_reference else (sr_t,)
                    columns[info.name].append(float(metric(*args).mean()))
            lr_t = to_tensor(_decode(lr_png)[None])
            upscaled = F.interpolate(lr_t, size=sr.shape[:2], mode="bicubic").clamp(0, 1)
            lr_up = to_uint8(upscaled)[0]
            crops["crop_lr_up"].append(png_bytes(centre_crop(lr_up, self.crop)))
            crops["crop_sr"].append(png_bytes(centre_crop(sr, self.crop)))
            crops["crop_hr"].append(
                png_bytes(centre_crop(hr, self.crop)) if hr is not None else b""
            )
        keep = {key: batch[key] for key in ("set", "image_id", "model")}
        return {
            **keep,
            **{name: np.asarray(values, np.float64) for name, values in columns.items()},
            **{name: np.asarray(values, dtype=object) for name, values in crops.items()},
        }
