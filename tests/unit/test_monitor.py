"""The reward-hacking monitor on scripted validation trajectories, and the validation that
feeds it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rfsr_ray.config import HackingMonitorConfig, build_config
from rfsr_ray.errors import ConfigError
from rfsr_ray.models import build_model
from rfsr_ray.train import loop
from rfsr_ray.train.context import ValidationSet
from rfsr_ray.train.monitor import HackingMonitor
from rfsr_ray.train.step import build_state
from rfsr_ray.train.validate import Validator


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


def test_validations_sample_and_score_the_base_model_once(tmp_path, monkeypatch):
    """The base never changes: later validations and the final table reuse its outputs and
    metrics, and the gains are measured against those same numbers."""
    cfg = build_config(
        {
            "data": {"patch_size": 32},
            "model": {"tiny": {"block_out_channels": [16, 32], "norm_num_groups": 8}},
            "schedule": {"num_inference_steps": 2},
            "losses": {
                "structure": {"window": [0, 0]},
                "reward": {"window": [1, 1], "terms": [{"name": "gmsd", "weight": 0.1}]},
                "gram": {"enabled": False},  # its VGG19 would take most of this test's time
            },
        }
    )
    torch.manual_seed(0)
    state = build_state(cfg, build_model(cfg.model, cfg.data.scale), torch.device("cpu"))
    with torch.no_grad():  # validation samples the EMA weights: make them differ from the base
        for shadow in state.ema.shadow_params:
            shadow.add_(0.05 * torch.randn_like(shadow))
    rng = np.random.default_rng(0)
    val_set = ValidationSet(
        lr=rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8),
        hr=rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
    )
    validator = Validator(cfg, val_set, state.losses, torch.device("cpu"))
    sampled, scored = [], []
    sample, scores = state.model.sample, validator.scores
    monkeypatch.setattr(
        state.model,
        "sample",
        lambda *args, reference=False: (
            sampled.append(reference) or sample(*args, reference=reference)
        ),
    )
    monkeypatch.setattr(
        validator, "scores", lambda sr: scored.append(sr is validator.base_sr) or scores(sr)
    )
    context = loop.LoopContext(run_dir=str(tmp_path))
    first = loop._validate(state, validator, context, cfg)
    second = loop._validate(state, validator, context, cfg)
    loop._export_final(state, validator, context, cfg, rank=0)
    assert sampled == [True, False, False]  # one base batch of 2 images, then one per validation
    assert scored == [True, False, False]
    base = validator.base_metrics
    assert base is not None
    for name in ("psnr", "ssim", "reward_gmsd"):
        assert first[f"val_{name}_gain"] == pytest.approx(first[f"val_{name}"] - base[name])
    assert first["val_piqe_gain"] == pytest.approx(base["piqe"] - first["val_piqe"])  # lower better
    assert first["val_psnr_gain"] != 0.0
    assert first["val_reward_gain"] == first["val_reward_gmsd_gain"]  # the objective's reward
    assert second == first  # the same weights give the same numbers
    table = (tmp_path / "final_table.md").read_text()
    bicubic = validator.bicubic_metrics["psnr"]
    assert f"| psnr ↑ | {bicubic:.4f} | {base['psnr']:.4f} | {first['val_psnr']:.4f} |" in table
    assert (tmp_path / "model").is_dir()
