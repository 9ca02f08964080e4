"""`normalize: true`: pyiqa score ranges parsed to numbers (approximate '~' bounds included)
before a lower-is-better metric is negated, and ranges without two finite bounds refused, at
config time and when the reward is built, with the same message."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from rfsr_ray.config import RewardConfig, build_config
from rfsr_ray.errors import ConfigError
from rfsr_ray.losses.rewards import PyiqaReward, build_reward
from rfsr_ray.score_range import (
    declared_range,
    higher_better_range,
    normalisation_bounds,
)


@pytest.mark.parametrize(
    ("score_range", "lower_better", "bounds"),
    [
        ("0, 1", False, (0.0, 1.0)),
        ("0, 1", True, (-1.0, 0.0)),  # lpips, nlpd
        ("0, ~1", True, (-1.0, 0.0)),  # gmsd
        ("0, ~1", False, (0.0, 1.0)),  # vif, vsi
        ("~0, ~100", True, (-100.0, 0.0)),  # niqe
        ("~0, ~150", True, (-150.0, 0.0)),  # brisque
        ("~-1, ~0.1", False, (-1.0, 0.1)),  # wadiqam
        ("-2, 2", True, (-2.0, 2.0)),  # afine
        ("-~1, -0", False, (-1.0, 0.0)),  # the old flip's output reads too
    ],
)
def test_two_finite_bounds_approximate_or_not_are_parsed_before_the_flip(
    score_range, lower_better, bounds
):
    assert normalisation_bounds("metric", score_range, lower_better) == bounds


@pytest.mark.parametrize(
    ("score_range", "lower_better", "shown"),
    [
        ("0, ~1", True, "~-1, 0"),
        ("0, 1", True, "-1, 0"),
        ("~0, ~100", True, "~-100, ~0"),
        ("0, ~", True, "~, 0"),  # open: pyiqa's own form ("~, 2")
        ("~0, ~100", False, "~0, ~100"),
        ("quality: 0, 1; rank: 0, 2", False, "quality: 0, 1; rank: 0, 2"),
    ],
)
def test_reward_range_of_a_negated_metric_is_written_in_pyiqa_form(
    score_range, lower_better, shown
):
    assert higher_better_range(score_range, lower_better) == shown


@pytest.mark.parametrize(
    "score_range",
    ["0, ~", "~0, ~", "~, 2", "quality: 0, 1; rank: 0, 2; rank_prob: 0, 1", None, "1, 0", "0, inf"],
)
def test_ranges_without_two_finite_bounds_are_refused_naming_the_range(score_range):
    with pytest.raises(ConfigError) as error:
        normalisation_bounds("metric", score_range, lower_better=True)
    message = str(error.value)
    assert "'metric'" in message and repr(score_range) in message
    assert "set normalize: false" in message


FINITE_PAIR = re.compile(r"^\s*~?-?\d+(\.\d+)?\s*,\s*~?-?\d+(\.\d+)?\s*$")


def test_every_pyiqa_metric_with_two_finite_bounds_normalises_and_no_other():
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    refused = []
    for name, entry in DEFAULT_CONFIGS.items():
        text, lower_better = declared_range(name)  # the static table read without pyiqa
        assert (text, lower_better) == (entry.get("score_range"), entry.get("lower_better", False))
        try:
            low, high = normalisation_bounds(name, text, lower_better)
        except ConfigError:
            refused.append(name)
            continue
        assert FINITE_PAIR.match(text) and low < high, name
    expected = [n for n, e in DEFAULT_CONFIGS.items() if not FINITE_PAIR.match(e["score_range"])]
    assert refused == expected
    assert {"mad", "fid", "pi", "afine_all", "fgresq_pair"} <= set(refused)
    assert not {"gmsd", "niqe", "brisque", "nlpd", "piqe", "psnr"} & set(refused)


def image_series(seed: int = 0, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(hr (4, 3, S, S), sr (4, 3, S, S)): one smooth image and four ever noisier copies."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, size // 8, size // 8, generator=generator)
    hr = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    noise = torch.randn(1, 3, size, size, generator=generator)
    amounts = torch.tensor([0.02, 0.05, 0.1, 0.2]).view(4, 1, 1, 1)
    return hr.expand(4, -1, -1, -1), (hr + amounts * noise).clamp(0, 1)


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("gmsd", -1.0, 0.0),  # lower is better, "0, ~1"
        ("nlpd", -1.0, 0.0),  # lower is better, "0, 1"
        ("piqe", -100.0, 0.0),  # lower is better, no reference, "0, 100"
        ("vif", 0.0, 1.0),  # higher is better, "0, ~1"
    ],
)
def test_normalised_weight_free_reward_maps_its_range_onto_0_1_increasingly(name, low, high):
    reward = PyiqaReward(name, normalize=True)
    assert reward.info.score_range == "0, 1"
    hr, sr = image_series()
    with torch.no_grad():
        raw = reward.metric(sr, hr) if reward.info.needs_hr else reward.metric(sr)
        normalised = reward(sr, hr=hr)
    raw = raw.float().flatten()
    lower_better = bool(reward.metric.lower_better)
    expected = ((-raw if lower_better else raw) - low) / (high - low)
    torch.testing.assert_close(normalised, expected, rtol=1e-5, atol=1e-6)
    # Monotone: the better the raw score, the higher the normalised reward.
    order = raw.argsort(descending=lower_better)
    assert (normalised[order].diff() >= 0).all()
    declared_low, declared_high = sorted((-high, -low) if lower_better else (low, high))
    inside = (raw >= declared_low) & (raw <= declared_high)
    assert inside.any()  # nlpd runs past its declared "0, 1" on noisy images: not clipped
    assert ((normalised[inside] >= 0) & (normalised[inside] <= 1)).all()


def test_open_range_is_refused_at_config_time_naming_the_range():
    tree = {"losses": {"reward": {"terms": [{"name": "mad", "normalize": True}]}}}
    with pytest.raises(ConfigError, match=r"'mad'.*'0, ~'.*set normalize: false"):
        build_config(tree)
    tree["losses"]["reward"]["terms"][0]["normalize"] = False
    assert build_config(tree).losses.reward.terms[0].name == "mad"
    accepted = build_config({"losses": {"reward": {"terms": [{"name": "gmsd", "normalize": 1}]}}})
    assert accepted.losses.reward.terms[0].normalize


def test_config_check_reads_the_range_table_without_importing_pyiqa():
    """Every Ray worker validates the config: the check must not pull in pyiqa (seconds)."""
    script = (
        "import sys\n"
        "from rfsr_ray.config import build_config\n"
        "terms = [{'name': 'fid', 'normalize': True}]\n"
        "try:\n"
        "    build_config({'losses': {'reward': {'terms': terms}}})\n"
        "except Exception as error:\n"
        "    print(type(error).__name__, 'pyiqa' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["ConfigError", "False"]


def test_open_range_is_refused_when_built_with_the_same_message():
    with pytest.raises(ConfigError) as at_build:
        PyiqaReward("mad", normalize=True)
    with pytest.raises(ConfigError) as at_config:
        build_config({"losses": {"reward": {"terms": [{"name": "mad", "normalize": True}]}}})
    assert str(at_build.value) in str(at_config.value)
    assert "'0, ~'" in str(at_build.value)


def test_imagereward_has_no_range_to_normalise_with():
    """ImageReward's scores are z-scored, with no declared range: `normalize` was ignored."""
    with pytest.raises(ConfigError, match=r"'imagereward'.*no declared range.*normalize: false"):
        build_config({"losses": {"reward": {"terms": [{"name": "imagereward", "normalize": 1}]}}})
    unchecked = RewardConfig.model_construct(name="imagereward", normalize=True)
    with pytest.raises(ConfigError, match="no declared range"):
        build_reward(unchecked)
