from __future__ import annotations

import numpy as np
import pytest

from rfsr_ray.config import DataConfig, DegradationConfig, build_config
from rfsr_ray.data import degradations as ops
from rfsr_ray.data import kernels
from rfsr_ray.data.pairs import pairs_from_image
from tests.conftest import natural_image


def high_frequency_energy(image: np.ndarray) -> float:
    return float(np.mean(np.abs(np.diff(image.astype(np.float64), axis=0))))


@pytest.mark.parametrize(
    "kind", ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]
)
def test_mixed_kernels_sum_to_one(kind):
    rng = np.random.default_rng(0)
    kernel, params = kernels.random_mixed_kernel(
        rng, 15, (kind,), (1.0,), (0.2, 3), (0.5, 4), (1, 2)
    )
    assert kernel.shape == (15, 15) and kernel.dtype == np.float32
    assert kernel.sum() == pytest.approx(1.0, abs=1e-5)
    assert params["type"] == kind


def test_sinc_kernel_sums_to_one_and_is_symmetric():
    kernel = kernels.sinc_kernel(13, np.pi / 3)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(kernel, kernel.T, atol=1e-7)


def test_isotropic_kernel_is_symmetric():
    kernel = kernels.gaussian_kernel(21, kernels.sigma_matrix(2.0, 2.0, 0.0))
    np.testing.assert_allclose(kernel, kernel.T, atol=1e-7)
    np.testing.assert_allclose(kernel, kernel[::-1, ::-1], atol=1e-7)


def test_larger_sigma_blurs_more():
    image = natural_image(64, 64).astype(np.float32) / 255
    energies = [
        high_frequency_energy(
            ops.blur(image, kernels.gaussian_kernel(21, kernels.sigma_matrix(s, s, 0)))
        )
        for s in (0.5, 1.5, 3.0)
    ]
    assert energies[0] > energies[1] > energies[2]


def test_lower_jpeg_quality_gives_larger_error():
    image = natural_image(64, 64).astype(np.float32) / 255
    errors = [np.abs(ops.jpeg(image, q) - image).mean() for q in (95, 60, 20)]
    assert errors[0] < errors[1] < errors[2]


def test_gaussian_noise_has_configured_std():
    flat = np.full((256, 256, 3), 0.5, np.float32)
    noisy = ops.add_gaussian_noise(flat, np.random.default_rng(0), sigma=10.0, gray=False)
    assert np.std(noisy - flat) * 255 == pytest.approx(10.0, rel=0.03)
    gray = ops.add_gaussian_noise(flat, np.random.default_rng(0), sigma=10.0, gray=True)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])


def test_poisson_noise_scales_with_scale():
    # A ramp with ~103 grey levels: photon count 2^ceil(log2(103)) = 128, std = scale*sqrt(x/128).
    ramp = np.tile(np.linspace(0.3, 0.7, 256, dtype=np.float32), (256, 1))
    image = np.repeat(ramp[..., None], 3, axis=2)
    small = ops.add_poisson_noise(image, np.random.default_rng(0), 0.5, gray=False)
    large = ops.add_poisson_noise(image, np.random.default_rng(0), 2.0, gray=False)
    assert np.std(large - image) == pytest.approx(4 * np.std(small - image), rel=0.05)
    assert np.std(small - image) == pytest.approx(0.5 * np.sqrt(0.5 / 128), rel=0.05)


@pytest.mark.parametrize("preset", ["realesrgan_x4plus", "mild", "bicubic"])
@pytest.mark.parametrize("scale", [2, 4])
def test_degrade_shapes_dtypes_ranges(preset, scale):
    cfg = build_config({"degradation": {"preset": preset, "usm_sharpen": True}}).degradation
    hr = natural_image(64, 64)
    for seed in range(5):
        target, lr, params = ops.degrade(hr, scale, cfg, np.random.default_rng(seed))
        assert target.shape == (64, 64, 3) and target.dtype == np.uint8
        assert lr.shape == (64 // scale, 64 // scale, 3) and lr.dtype == np.uint8
        assert params["mode"] == ("bicubic" if preset == "bicubic" else "second_order")


def test_usm_sharpening_raises_high_frequencies():
    image = natural_image(64, 64).astype(np.float32) / 255
    sharp = ops.usm_sharpen(image, 0.5, 50, 10)
    assert high_frequency_energy(sharp) > high_frequency_energy(image)


def pair(seed: int = 0, epoch: int = 0, source: str = "a", crop: int = 0):
    data = DataConfig(patch_size=32, crops_per_image=1, seed=seed)
    return pairs_from_image(natural_image(), source, crop + 1, epoch, data, DegradationConfig())[
        crop
    ]


def test_pairs_are_deterministic_and_vary_with_seed_epoch_source_crop():
    first = pair()
    np.testing.assert_array_equal(first["lr"], pair()["lr"])
    assert first["degradation"] == pair()["degradation"]
    for other in (pair(seed=1), pair(epoch=1), pair(source="b"), pair(crop=1)):
        assert other["degradation"] != first["degradation"]
