from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pytorch_wavelets import DTCWTForward

from rfsr_ray.config import GramLossConfig, RewardConfig, StructureLossConfig
from rfsr_ray.errors import ConfigError, WeightsError
from rfsr_ray.losses.gram import GramRegulariser, VGGFeatures, gram_distance, gram_matrix
from rfsr_ray.losses.rewards import PyiqaReward, build_reward
from rfsr_ray.losses.structure import StructureLoss


def smooth_image(seed: int = 0, size: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(2, 3, size // 8, size // 8, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bilinear").clamp(0, 1)


@pytest.mark.parametrize("wavelet", ["haar", "db2", "dtcwt"])
def test_structure_loss_sees_low_not_high_frequencies(wavelet):
    loss = StructureLoss(StructureLossConfig(wavelet=wavelet, levels=3))
    image = smooth_image()
    assert float(loss(image, image)) == 0.0
    brighter = loss(image.add(0.1), image)  # a low-frequency change
    checker = (torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2 * 2 - 1
    noisy = loss(image + 0.1 * checker, image)  # same amplitude, highest frequency
    assert float(brighter) > 0.05
    assert float(noisy) < 0.05 * float(brighter)


def test_dtcwt_equals_direct_library_computation():
    loss = StructureLoss(StructureLossConfig(wavelet="dtcwt", levels=3))
    sr, hr = smooth_image(0), smooth_image(1)
    transform = DTCWTForward(J=3, biort="near_sym_b", qshift="qshift_b")
    expected = (transform(sr)[0] - transform(hr)[0]).abs().mean()
    torch.testing.assert_close(loss(sr, hr), expected)


def gram_config(variant: str) -> GramLossConfig:
    return GramLossConfig(variant=variant, allow_random_vgg=True)


def test_gram_l1_equals_direct_computation():
    regulariser = GramRegulariser(gram_config("l1"))
    sr, ref = smooth_image(0), smooth_image(1)
    expected = torch.zeros(2)
    for weight, a, b in zip(
        (0.1, 0.1, 1, 1, 1), regulariser.features(sr), regulariser.features(ref), strict=True
    ):
        c, h, w = a.shape[1:]
        na = F.layer_norm(a, a.shape[1:]).reshape(2, c, h * w)
        nb = F.layer_norm(b, b.shape[1:]).reshape(2, c, h * w)
        ga, gb = na @ na.transpose(1, 2) / (c * h * w), nb @ nb.transpose(1, 2) / (c * h * w)
        expected += weight * (ga - gb).abs().mean(dim=(1, 2))
    torch.testing.assert_close(regulariser(sr, ref), expected.mean(), rtol=1e-4, atol=1e-7)


def test_gram_kl_nonnegative_and_zero_for_identical():
    regulariser = GramRegulariser(gram_config("kl"))
    sr, ref = smooth_image(0), smooth_image(1)
    assert float(regulariser(sr, sr)) == pytest.approx(0.0, abs=1e-7)
    assert float(regulariser(sr, ref)) > 0


def photo(name: str, top: int, left: int, size: int = 128) -> torch.Tensor:
    """A skimage.data photo crop, 2·size px area-downsampled to (1, 3, size, size) in [0, 1]."""
    from skimage import data

    pixels = getattr(data, name)()[top : top + 2 * size, left : left + 2 * size]
    image = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255)[None]
    return F.interpolate(image, size=(size, size), mode="area")


def style_drift(image: torch.Tensor) -> torch.Tensor:
    """What reward hacking tends to add: more saturation and contrast, and a faint
    high-frequency pattern, on the same content."""
    grey = image.mean(dim=1, keepdim=True)
    vivid = ((grey + 1.6 * (image - grey) - 0.5) * 1.4 + 0.5).clamp(0, 1)
    index = torch.arange(image.shape[-1], dtype=torch.float32)
    pattern = torch.sin(2.2 * index)[:, None] * torch.sin(2.2 * index)[None, :]
    return (vivid + 0.06 * pattern).clamp(0, 1)


def test_gram_kl_responds_to_style_drift_relative_to_unrelated_images_as_l1_does():
    """Raw Gram entries are ~1/C, so softmax(G) at τ = 1 was uniform to ~1e-3 and `kl` ~1e-7:
    inert, and far less sensitive to drift (relative to an unrelated image) than `l1`. With
    standardised rows both see the drift as a similar fraction of the unrelated distance.
    Seeded random VGG19 features: no real weights offline."""
    regulariser = GramRegulariser(gram_config("l1"))
    astronaut = photo("astronaut", 0, 100)
    images = torch.cat([astronaut, style_drift(astronaut), photo("coffee", 50, 100)])
    with torch.no_grad():
        grams = regulariser.grams(images)
        reference = regulariser.grams(astronaut.expand(3, -1, -1, -1))
    l1 = gram_distance(grams, reference, gram_config("l1"))
    kl = gram_distance(grams, reference, gram_config("kl"))
    assert float(l1[0]) == 0.0 and float(kl[0]) == pytest.approx(0.0, abs=1e-6)
    assert (kl >= 0).all()
    l1_ratio, kl_ratio = float(l1[1] / l1[2]), float(kl[1] / kl[2])
    assert 0 < l1_ratio < 1 and 0 < kl_ratio < 1  # the drift stays closer than another photo
    assert l1_ratio / 3 < kl_ratio < 3 * l1_ratio  # measured 0.22 (l1) and 0.10 (kl)
    assert float(kl[1]) > 1e-3  # not inert (unstandardised: 1.3e-7)


def test_gram_matrix_shape_and_fp32():
    features = torch.randn(2, 8, 5, 5, dtype=torch.float16)
    gram = gram_matrix(features)
    assert gram.shape == (2, 8, 8) and gram.dtype == torch.float32
    torch.testing.assert_close(gram, gram.transpose(1, 2))


def test_vgg_pre_relu_features_keep_negative_values():
    features = VGGFeatures(gram_config("l1"))(smooth_image())
    assert len(features) == 5 and all((f < 0).any() for f in features)


def test_missing_vgg_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="allow_random_vgg"):
        VGGFeatures(GramLossConfig())
    with pytest.raises(WeightsError, match="does not exist"):
        VGGFeatures(GramLossConfig(vgg_weights=str(tmp_path / "nope.pth")))


def test_vgg_weights_load_from_a_torchvision_state_dict(tmp_path):
    from torchvision.models import vgg19

    state = vgg19(weights=None).state_dict()
    torch.save(state, tmp_path / "vgg19.pth")
    features = VGGFeatures(GramLossConfig(vgg_weights=str(tmp_path / "vgg19.pth")))
    assert not features.random_weights
    torch.testing.assert_close(features.trunk[2].weight, state["features.2.weight"])


def test_lower_better_metric_is_turned_into_a_reward_that_ascends():
    reward = PyiqaReward("gmsd")  # gmsd: lower is better
    assert reward.info.needs_hr and reward.info.name == "gmsd"
    hr = smooth_image(0)
    sr = (hr + 0.2 * torch.randn(hr.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    sr.requires_grad_(True)
    optimiser = torch.optim.Adam([sr], lr=0.01)
    start = float(reward(sr, hr=hr).mean().detach())
    for _ in range(10):
        optimiser.zero_grad()
        (-reward(sr, hr=hr).mean()).backward()
        optimiser.step()
    assert float(reward(sr, hr=hr).mean()) > start + 0.01


@pytest.mark.parametrize("form", ["hinge", "linear"])
def test_reward_loss_forms(form):
    term = build_reward(RewardConfig(name="ssim", weight=0.5, form=form, margin=2.0))
    hr = smooth_image()
    loss, score = term(hr, hr=hr)
    expected = 0.5 * ((2.0 - score).clamp(min=0) if form == "hinge" else -score).mean()
    torch.testing.assert_close(loss, expected)
    assert score.shape == (2,)


@pytest.mark.parametrize("name", ["piqe", "entropy"])
def test_non_differentiable_metric_is_refused(name):
    with pytest.raises(ConfigError, match="gradient"):
        build_reward(RewardConfig(name=name))


def test_unknown_metric_is_refused():
    with pytest.raises(ConfigError, match="not a pyiqa metric"):
        build_reward(RewardConfig(name="not_a_metric"))
