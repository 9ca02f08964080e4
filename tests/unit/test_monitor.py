"""The reward-hacking monitor on scripted validation trajectories."""

from __future__ import annotations

import pytest

from rfsr_ray.config import HackingMonitorConfig, build_config
from rfsr_ray.errors import ConfigError
from rfsr_ray.train.monitor import HackingMonitor


def run(rewards, held_out, **settings):
    monitor = HackingMonitor(HackingMonitorConfig(**settings))
    return [monitor.update(r, h) for r, h in zip(rewards, held_out, strict=True)]


def test_fires_when_reward_rises_and_held_out_falls_for_patience_validations():
    rewards = [0.10, 0.12, 0.14, 0.16]
    held_out = [{"psnr": 25.0, "neg_piqe": -80.0}, {"psnr": 24.5, "neg_piqe": -80.0},
                {"psnr": 24.0, "neg_piqe": -81.0}, {"psnr": 23.5, "neg_piqe": -83.0}]  # fmt: skip
    signals = run(rewards, held_out, patience=2, threshold=0.002)
    assert [s.streak for s in signals] == [0, 1, 2, 3]
    assert [s.fired for s in signals] == [False, False, True, True]
    assert set(signals[2].falling) == {"psnr", "neg_piqe"}
    assert signals[1].falling["psnr"] == pytest.approx(0.02)


def test_silent_when_both_rise_when_reward_falls_and_below_threshold():
    both_rise = run([0.1, 0.2, 0.3], [{"psnr": 24.0}, {"psnr": 24.5}, {"psnr": 25.0}])
    assert not any(s.fired for s in both_rise) and {s.streak for s in both_rise} == {0}
    reward_falls = run([0.3, 0.2, 0.1], [{"psnr": 25.0}, {"psnr": 24.0}, {"psnr": 23.0}])
    assert not any(s.fired for s in reward_falls)
    tiny_drop = run([0.1, 0.2, 0.3], [{"psnr": 25.0}, {"psnr": 24.99}, {"psnr": 24.98}])
    assert not any(s.fired for s in tiny_drop)  # 0.04 % < 0.2 %


def test_a_clean_validation_resets_the_streak():
    signals = run(
        [0.1, 0.2, 0.3, 0.4, 0.5],
        [{"ssim": 0.8}, {"ssim": 0.7}, {"ssim": 0.75}, {"ssim": 0.6}, {"ssim": 0.5}],
        patience=2,
    )
    assert [s.streak for s in signals] == [0, 1, 0, 1, 2]
    assert signals[-1].fired


def test_held_out_metrics_must_not_be_optimised():
    with pytest.raises(ConfigError, match=r"losses\.monitor\.held_out"):
        build_config({"losses": {"monitor": {"held_out": ["psnr", "gmsd"]}}})
    cfg = build_config({"losses": {"monitor": {"held_out": ["psnr", "gmsd"], "enabled": False}}})
    assert not cfg.losses.monitor.enabled


def test_default_held_out_list_leaves_out_optimised_rewards():
    cfg = build_config({"losses": {"reward": {"terms": [{"name": "ssim"}]}}})
    assert cfg.held_out_metrics() == ("psnr", "piqe")
    assert build_config().held_out_metrics() == ("psnr", "ssim", "piqe")
    off = build_config({"losses": {"monitor": {"enabled": False}}})
    assert off.held_out_metrics() == ()
