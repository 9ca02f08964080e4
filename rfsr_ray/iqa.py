"""The one place a pyiqa metric is built: for evaluation, validation, the offline weight check and
(with `as_loss=True`) rewards. PSNR and SSIM are measured on the Y channel of YCbCr, as the
super-resolution papers report them."""

from __future__ import annotations

import logging
from typing import Any

import torch

from rfsr_ray import logs
from rfsr_ray.errors import ConfigError, WeightsError
from rfsr_ray.hub import cache_only_when_unreachable

# pyiqa metrics that need no downloaded weights and have a gradient (checked offline).
WEIGHT_FREE_DIFFERENTIABLE = (
    "psnr",
    "ssim",
    "fsim",
    "vsi",
    "gmsd",
    "nlpd",
    "mad",
    "vif",
    "cw_ssim",
)

# Options of metrics used as measurements (not as losses): the papers' Y-channel PSNR/SSIM.
MEASURE_OPTIONS: dict[str, dict[str, Any]] = {
    "psnr": {"test_y_channel": True, "color_space": "ycbcr"},
    "ssim": {"test_y_channel": True, "color_space": "ycbcr"},
}


def known_metric(name: str, used_by: str) -> None:
    """Raise `ConfigError` naming `used_by` (a config key) when pyiqa has no metric `name`."""
    import pyiqa  # heavy import, only when a metric is actually needed

    if name not in pyiqa.list_models():
        raise ConfigError(
            f"{used_by}: {name!r} is not a pyiqa metric; see pyiqa.list_models(), e.g. "
            f"{', '.join(WEIGHT_FREE_DIFFERENTIABLE)}"
        )


def create_metric(name: str, device: torch.device | str = "cpu", as_loss: bool = False) -> Any:
    """A pyiqa metric by name. `as_loss=True`: differentiable, one score per image (rewards);
    otherwise a measurement with `MEASURE_OPTIONS`. When the hub cannot be reached, weights come
    from the caches alone, so a missing one fails at once instead of after a minute of retries;
    any failure to build (pyiqa raises URLError, OSError, RuntimeError, ...) is a `WeightsError`
    saying why and how to stage the weights."""
    import pyiqa
    from pyiqa.utils.logger import get_root_logger

    if not logs.verbose():  # pyiqa announces every network it builds at INFO
        get_root_logger().setLevel(logging.WARNING)
    options = (
        {"as_loss": True, "loss_reduction": "none"} if as_loss else MEASURE_OPTIONS.get(name, {})
    )
    try:
        with cache_only_when_unreachable():
            return pyiqa.create_metric(name, device=torch.device(device), **options)
    except Exception as error:
        raise WeightsError(f"pyiqa metric {name!r} {why_not_built(error)}") from None


def why_not_built(error: Exception) -> str:
    """A one-line reason a metric could not be built, with the fix when weights are missing."""
    from pyiqa.utils.download_util import DEFAULT_CACHE_DIR

    text = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
    offline = ("urlopen", "URLError", "HTTP", "LocalEntryNotFound", "OfflineMode", "resolve")
    if any(word in text for word in offline):
        return (
            f"could not be built ({text[:160]}); weights not available offline: stage "
            f"them on a machine with network access into {DEFAULT_CACHE_DIR} (pyiqa's "
            "cache), $TORCH_HOME or the Hugging Face cache ($HF_HOME), then copy that cache to "
            "this machine, or use a "
            f"weight-free metric ({', '.join(WEIGHT_FREE_DIFFERENTIABLE)})"
        )
    return f"could not be built ({text})"
