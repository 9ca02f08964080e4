"""benchmarks/flops.py: the index arithmetic is exact and the tiny family's parts add up."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from benchmarks.flops import (
    FlopMeter,
    LiveBytes,
    count,
    demo_setup,
    expected_max,
    sum_distribution,
)


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_expected_max_matches_brute_force(ranks: int) -> None:
    values = np.array([0.0, 1.0, 2.0, 5.0, 9.0])
    probabilities = np.array([0.1, 0.3, 0.0, 0.4, 0.2])
    brute = sum(
        max(values[list(draw)]) * np.prod(probabilities[list(draw)])
        for draw in itertools.product(range(len(values)), repeat=ranks)
    )
    assert expected_max(values, probabilities, ranks) == pytest.approx(brute)


def test_reference_windows_expected_index() -> None:
    # Uniform over 0-19 ∪ 40-49: E[i] = 635/30, and the deepest of 8 ranks is near 45.
    probabilities = np.zeros(50)
    probabilities[list(range(20)) + list(range(40, 50))] = 1 / 30
    indices = np.arange(50.0)
    assert expected_max(indices, probabilities, 1) == pytest.approx(635 / 30)
    assert 44 < expected_max(indices, probabilities, 8) < 46


def test_sum_distribution_of_two_draws() -> None:
    values, probabilities = sum_distribution(np.array([1.0, 3.0]), np.array([0.25, 0.75]), 2)
    assert values.tolist() == [2.0, 4.0, 6.0]
    assert probabilities.tolist() == pytest.approx([0.0625, 0.375, 0.5625])


def test_tiny_parts_are_positive_and_add_up_to_the_step() -> None:
    """The parts' FLOPs equal a whole rfsr_loss + backward at a reward index (tiny family)."""
    from rfsr_ray.losses.rfsr import RFSRLosses
    from rfsr_ray.train.step import Batch, rfsr_loss

    torch.set_num_threads(1)
    model, cfg, parts = demo_setup(torch.device("cpu"))
    flops = count(parts)
    for name in ("rollout, per sampler call", "model forward (grad)", "model backward"):
        assert flops[name] > 0
    losses = RFSRLosses(cfg)
    index = cfg.losses.reward.window[0]
    hr = torch.rand(cfg.train.batch_size, 3, cfg.data.patch_size, cfg.data.patch_size)
    lr = torch.nn.functional.interpolate(hr, scale_factor=1 / cfg.data.scale, mode="area")
    meter = FlopMeter()
    with meter.region():
        rfsr_loss(model, losses, Batch(lr, hr), index, cfg, None).loss.backward()
    expected = sum(flops[p.name] * p.active(index) for p in parts)
    assert meter.flops == pytest.approx(expected, rel=0.02)


def test_live_bytes_tracks_storages() -> None:
    with LiveBytes() as live:
        a = torch.empty(1000)
        view = a.view(10, 100)
        b = a * 2
        del a, view
        after_free = live.current
        del b
    assert live.peak == 8000
    assert after_free == 4000
    assert live.current == 0
