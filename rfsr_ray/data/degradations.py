"""Real-ESRGAN second-order degradation of one HR patch into its LR partner (METHOD.md section 5).

Images inside the pipeline are float32 (H, W, 3) RGB in [0, 1]; the public entry `degrade` takes and
returns uint8. Every random draw comes from the `numpy.random.Generator` passed in, so a pair is a
pure function of (HR patch, config, seed) and is reproducible on any machine. OpenCV does the pixel
work (filtering, resizing, JPEG) because it is several times faster than PIL or torch on one core.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from PIL import Image

from rfsr_ray.config import DegradationConfig
from rfsr_ray.data import kernels

_RESIZE_FLAGS = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}


# -------------------------------------------------------------------------------- single ops
def blur(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve each channel with `kernel` (reflect padding, as Real-ESRGAN's filter2D)."""
    return cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REFLECT_101)


def resize(image: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    height, width = max(1, int(height)), max(1, int(width))
    return cv2.resize(image, (width, height), interpolation=_RESIZE_FLAGS[mode])


def add_gaussian_noise(
    image: np.ndarray, rng: np.random.Generator, sigma: float, gray: bool
) -> np.ndarray:
    """Add N(0, (sigma/255)^2) noise, one map for all channels if `gray`; clipped to [0, 1]."""
    shape = (*image.shape[:2], 1) if gray else image.shape
    noise = rng.standard_normal(shape, dtype=np.float32)
    return np.clip(image + noise * np.float32(sigma / 255.0), 0.0, 1.0)


def add_poisson_noise(
    image: np.ndarray, rng: np.random.Generator, scale: float, gray: bool
) -> np.ndarray:
    """Add scaled shot noise, photon count set by the number of distinct levels (Real-ESRGAN)."""
    base = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None] if gray else image
    base = np.clip(base, 0.0, 1.0)
    quantised = np.round(base * 255.0).astype(np.uint8)
    levels = int(np.count_nonzero(np.bincount(quantised.ravel(), minlength=256)))
    photons = 2.0 ** np.ceil(np.log2(max(levels, 2)))
    noise = rng.poisson(base * photons) / photons - base
    return np.clip(image + (noise * scale).astype(np.float32), 0.0, 1.0)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """Round-trip through a real JPEG codec at `quality` (1-100)."""
    as_uint8 = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    ok, buffer = cv2.imencode(".jpg", as_uint8[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - OpenCV only fails on impossible shapes
        raise RuntimeError(f"JPEG encoding failed for an image of shape {image.shape}")
    return cv2.imdecode(buffer, cv2.IMREAD_COLOR)[..., ::-1].astype(np.float32) / 255.0


def usm_sharpen(image: np.ndarray, weight: float, radius: int, threshold: float) -> np.ndarray:
    """Unsharp-mask the HR target (SeeSR's pair script); threshold is on the 0-255 scale."""
    radius += 1 - radius % 2
    blurred = cv2.GaussianBlur(image, (radius, radius), 0)
    residual = image - blurred
    mask = (np.abs(residual) * 255 > threshold).astype(np.float32)
    soft_mask = cv2.GaussianBlur(mask, (radius, radius), 0)
    sharp = np.clip(image + weight * residual, 0, 1)
    return soft_mask * sharp + (1 - soft_mask) * image


def bicubic_downscale(image: np.ndarray, scale: int) -> np.ndarray:
    """Antialiased bicubic downscale (MATLAB-imresize-like, via Pillow) of a uint8 image."""
    height, width = image.shape[:2]
    resized = Image.fromarray(image).resize((width // scale, height // scale), Image.BICUBIC)
    return np.asarray(resized)


# -------------------------------------------------------------------------------- random stages
def _draw_kernel(
    rng: np.random.Generator, cfg: DegradationConfig, second: bool
) -> tuple[np.ndarray, dict[str, Any]]:
    size = int(rng.choice(np.arange(cfg.kernel_range[0], cfg.kernel_range[1] + 1, 2)))
    if rng.uniform() < (cfg.sinc_prob2 if second else cfg.sinc_prob):
        low = np.pi / 3 if size < 13 else np.pi / 5
        cutoff = float(rng.uniform(low, np.pi))
        return kernels.sinc_kernel(size, cutoff), {"type": "sinc", "size": size, "cutoff": cutoff}
    return kernels.random_mixed_kernel(
        rng,
        size,
        cfg.kernel_list,
        cfg.kernel_prob2 if second else cfg.kernel_prob,
        cfg.blur_sigma2 if second else cfg.blur_sigma,
        cfg.betag_range2 if second else cfg.betag_range,
        cfg.betap_range2 if second else cfg.betap_range,
    )


def _random_noise(
    image: np.ndarray, rng: np.random.Generator, cfg: DegradationConfig, second: bool
) -> tuple[np.ndarray, dict[str, Any]]:
    gray = bool(rng.uniform() < (cfg.gray_noise_prob2 if second else cfg.gray_noise_prob))
    if rng.uniform() < (cfg.gaussian_noise_prob2 if second else cfg.gaussian_noise_prob):
        sigma = float(rng.uniform(*(cfg.noise_range2 if second else cfg.noise_range)))
        return add_gaussian_noise(image, rng, sigma, gray), {
            "type": "gaussian",
            "sigma": sigma,
            "gray": gray,
        }
    scale = float(rng.uniform(*(cfg.poisson_scale_range2 if second else cfg.poisson_scale_range)))
    return add_poisson_noise(image, rng, scale, gray), {
        "type": "poisson",
        "scale": scale,
        "gray": gray,
    }


def _random_scale(
    rng: np.random.Generator, probs: tuple[float, ...], span: tuple[float, float]
) -> float:
    direction = rng.choice(3, p=np.asarray(probs) / sum(probs))
    if direction == 0:
        return float(rng.uniform(1.0, max(1.0, span[1])))
    if direction == 1:
        return float(rng.uniform(min(1.0, span[0]), 1.0))
    return 1.0


def _random_jpeg(
    image: np.ndarray, rng: np.random.Generator, quality_range: tuple[int, int]
) -> tuple[np.ndarray, int]:
    quality = int(rng.integers(quality_range[0], quality_range[1] + 1))
    return jpeg(image, quality), quality


def second_order(
    hr: np.ndarray, scale: int, cfg: DegradationConfig, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, Any]]:
    """Degrade a float (H, W, 3) [0, 1] HR patch into a float (H/scale, W/scale, 3) LR patch."""
    height, width = hr.shape[:2]
    params: dict[str, Any] = {}
    modes = cfg.resize_modes
    kernel, params["kernel1"] = _draw_kernel(rng, cfg, second=False)
    out = blur(hr, kernel)
    factor = _random_scale(rng, cfg.resize_prob, cfg.resize_range)
    params["resize1"] = {"scale": factor, "mode": str(rng.choice(modes))}
    out = resize(out, height * factor, width * factor, params["resize1"]["mode"])
    out, params["noise1"] = _random_noise(out, rng, cfg, second=False)
    out, params["jpeg1"] = _random_jpeg(out, rng, cfg.jpeg_range)

    if rng.uniform() < cfg.second_blur_prob:
        kernel, params["kernel2"] = _draw_kernel(rng, cfg, second=True)
        out = blur(out, kernel)
    factor = _random_scale(rng, cfg.resize_prob2, cfg.resize_range2)
    params["resize2"] = {"scale": factor, "mode": str(rng.choice(modes))}
    out = resize(out, height / scale * factor, width / scale * factor, params["resize2"]["mode"])
    out, params["noise2"] = _random_noise(out, rng, cfg, second=True)

    final_kernel = None
    if rng.uniform() < cfg.final_sinc_prob:
        size = int(rng.choice(np.arange(cfg.kernel_range[0], cfg.kernel_range[1] + 1, 2)))
        cutoff = float(rng.uniform(np.pi / 3, np.pi))
        final_kernel = kernels.sinc_kernel(size, cutoff)
        params["final_sinc"] = {"size": size, "cutoff": cutoff}
    final_mode = str(rng.choice(modes))
    params["final_order"] = "resize_first" if rng.uniform() < 0.5 else "jpeg_first"
    if params["final_order"] == "resize_first":
        out = resize(out, height // scale, width // scale, final_mode)
        out = out if final_kernel is None else blur(out, final_kernel)
        out, params["jpeg2"] = _random_jpeg(out, rng, cfg.jpeg_range2)
    else:
        out, params["jpeg2"] = _random_jpeg(out, rng, cfg.jpeg_range2)
        out = resize(out, height // scale, width // scale, final_mode)
        out = out if final_kernel is None else blur(out, final_kernel)
    params["final_resize_mode"] = final_mode
    return np.clip(out, 0.0, 1.0), params


def degrade(
    hr: np.ndarray, scale: int, cfg: DegradationConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Make one training pair from a uint8 (H, W, 3) HR patch.

    Returns `(hr_target, lr, params)`: the (optionally USM-sharpened) uint8 HR target, the uint8
    (H/scale, W/scale, 3) LR image, and every sampled parameter (JSON-serialisable).
    """
    if cfg.usm_sharpen:
        sharp = usm_sharpen(
            hr.astype(np.float32) / 255.0, cfg.usm_weight, cfg.usm_radius, cfg.usm_threshold
        )
        hr = np.clip(np.round(sharp * 255.0), 0, 255).astype(np.uint8)
    if cfg.mode == "bicubic":
        return hr, bicubic_downscale(hr, scale), {"mode": "bicubic"}
    lr, params = second_order(hr.astype(np.float32) / 255.0, scale, cfg, rng)
    params["mode"] = "second_order"
    return hr, np.clip(np.round(lr * 255.0), 0, 255).astype(np.uint8), params
