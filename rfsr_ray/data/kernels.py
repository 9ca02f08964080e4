"""Blur kernels of the Real-ESRGAN degradation model.

Written by hand (after BasicSR's `degradations.py`) because no maintained library ships these
kernel families; BasicSR itself imports torchvision internals that no longer exist. Every kernel is
a float32 (k, k) array that sums to 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import special

from rfsr_ray.config import KernelType


def mesh_grid(kernel_size: int) -> np.ndarray:
    """(k, k, 2) coordinates centred on the kernel's middle pixel."""
    axis = np.arange(-(kernel_size // 2), kernel_size // 2 + 1, dtype=np.float64)
    xx, yy = np.meshgrid(axis, axis)
    return np.stack([xx, yy], axis=-1)


def sigma_matrix(sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """2x2 covariance of a Gaussian with axis sigmas rotated by theta (radians)."""
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return rotation @ np.diag([sigma_x**2, sigma_y**2]) @ rotation.T


def _mahalanobis(kernel_size: int, covariance: np.ndarray) -> np.ndarray:
    grid = mesh_grid(kernel_size)
    inverse = np.linalg.inv(covariance)
    return np.sum((grid @ inverse) * grid, axis=-1)


def _normalised(kernel: np.ndarray) -> np.ndarray:
    return (kernel / kernel.sum()).astype(np.float32)


def gaussian_kernel(kernel_size: int, covariance: np.ndarray) -> np.ndarray:
    return _normalised(np.exp(-0.5 * _mahalanobis(kernel_size, covariance)))


def generalized_gaussian_kernel(
    kernel_size: int, covariance: np.ndarray, beta: float
) -> np.ndarray:
    return _normalised(np.exp(-0.5 * np.power(_mahalanobis(kernel_size, covariance), beta)))


def plateau_kernel(kernel_size: int, covariance: np.ndarray, beta: float) -> np.ndarray:
    return _normalised(1.0 / (np.power(_mahalanobis(kernel_size, covariance), beta) + 1.0))


def sinc_kernel(kernel_size: int, cutoff: float) -> np.ndarray:
    """Circular low-pass (2-D sinc) kernel with cutoff frequency `cutoff` in (0, pi]."""
    centre = (kernel_size - 1) / 2
    yy, xx = np.mgrid[0:kernel_size, 0:kernel_size].astype(np.float64)
    radius = np.hypot(xx - centre, yy - centre)
    with np.errstate(divide="ignore", invalid="ignore"):
        kernel = cutoff * special.j1(cutoff * radius) / (2 * np.pi * radius)
    kernel[radius == 0] = cutoff**2 / (4 * np.pi)
    return _normalised(kernel)


def _sample_beta(rng: np.random.Generator, beta_range: tuple[float, float]) -> float:
    # Real-ESRGAN draws beta below or above 1 with equal probability so both tails are explored.
    if rng.uniform() < 0.5:
        return float(rng.uniform(beta_range[0], max(beta_range[0], 1.0)))
    return float(rng.uniform(min(beta_range[1], 1.0), beta_range[1]))


def random_mixed_kernel(
    rng: np.random.Generator,
    kernel_size: int,
    kernel_list: tuple[KernelType, ...],
    kernel_prob: tuple[float, ...],
    sigma_range: tuple[float, float],
    betag_range: tuple[float, float],
    betap_range: tuple[float, float],
) -> tuple[np.ndarray, dict[str, Any]]:
    """Draw one blur kernel of a randomly chosen family; returns the kernel and its parameters."""
    kind = str(rng.choice(kernel_list, p=np.asarray(kernel_prob) / sum(kernel_prob)))
    sigma_x = float(rng.uniform(*sigma_range))
    if kind.endswith("iso") and not kind.endswith("aniso"):
        sigma_y, theta = sigma_x, 0.0
    else:
        sigma_y, theta = float(rng.uniform(*sigma_range)), float(rng.uniform(-np.pi, np.pi))
    covariance = sigma_matrix(sigma_x, sigma_y, theta)
    params: dict[str, Any] = {
        "type": kind,
        "size": kernel_size,
        "sigma": [sigma_x, sigma_y],
        "theta": theta,
    }
    if kind.startswith("generalized"):
        params["beta"] = _sample_beta(rng, betag_range)
        kernel = generalized_gaussian_kernel(kernel_size, covariance, params["beta"])
    elif kind.startswith("plateau"):
        params["beta"] = _sample_beta(rng, betap_range)
        kernel = plateau_kernel(kernel_size, covariance, params["beta"])
    else:
        kernel = gaussian_kernel(kernel_size, covariance)
    return kernel, params
