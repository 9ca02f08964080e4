"""`schedule.mode: trajectory_buffer` (issue 16 section 3): one no-grad rollout per refresh serves
`refresh_every` optimiser steps; with one index per trajectory its loss is trajectory mode's."""

from __future__ import annotations

import pytest
import torch

from rfsr_ray.errors import ConfigError
from rfsr_ray.models import build_model
from rfsr_ray.train.step import Batch, build_state, gradient_step, optimizer_step, rfsr_loss
from tests.unit.helpers import fixed_batch, tiny_config

# tiny_config's windows: structure 0-2, reward 5-7, Gram 6-7 (8 sampler steps, DDIM)
WINDOW_INDICES = [0, 1, 2, 5, 6, 7]


def make_state(**schedule):
    cfg = tiny_config(schedule={"mode": "trajectory_buffer", **schedule})
    torch.manual_seed(0)
    return cfg, build_state(cfg, build_model(cfg.model, cfg.data.scale), torch.device("cpu"))


@pytest.mark.parametrize("index", [2, 6])
def test_with_one_index_per_trajectory_the_loss_is_trajectory_modes(index):
    cfg, state = make_state(buffer={"refresh_every": 1})
    batch = fixed_batch()
    trajectory_cfg = tiny_config()  # mode: trajectory
    expected = rfsr_loss(
        state.model, state.losses, batch, index, trajectory_cfg, torch.Generator().manual_seed(7)
    )
    generator = torch.Generator().manual_seed(7)
    state.buffer.refill(state.model, [batch], cfg, generator, step=0)
    entry = state.buffer.entries[0]
    assert sorted(entry.latents) == WINDOW_INDICES
    output = gradient_step(
        state.model, state.losses, entry.batch, entry.condition, entry.latents[index], index,
        cfg, generator,
    )  # fmt: skip
    assert torch.equal(output.loss, expected.loss)
    assert output.terms == expected.terms


def fresh_batches(step):
    return [fixed_batch(seed=10 * step), fixed_batch(seed=10 * step + 1)]


def test_a_rollout_serves_refresh_every_steps_with_growing_staleness():
    cfg, state = make_state(buffer={"refresh_every": 3})
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"grad_accum": 2})})
    served, staleness = [], []
    for step in range(7):
        # what the training loop does: no new pairs while the buffer is fresh
        fresh = state.buffer.stale(state.step)
        batches = fresh_batches(step) if fresh else state.buffer.batches()
        result = optimizer_step(state, batches, cfg)
        served.append(state.buffer.entries[0].batch.hr_image)
        staleness.append(result.terms["buffer_staleness"])
    assert staleness == [0, 1, 2, 0, 1, 2, 0]
    assert torch.equal(served[0], fixed_batch(seed=0).hr_image)
    assert torch.equal(served[2], served[0])  # steps 1-2 reuse step 0's pairs
    assert torch.equal(served[3], fixed_batch(seed=30).hr_image)  # refreshed with step 3's
    assert result.terms["buffer_mib"] > 0


def test_a_buffer_over_its_memory_bound_is_refused_with_the_fix():
    cfg, state = make_state(buffer={"max_mib": 0.01})
    with pytest.raises(ConfigError, match=r"needs \d+ MiB per worker .* schedule.buffer.max_mib"):
        optimizer_step(state, [fixed_batch()], cfg)


def test_trajectory_mode_has_no_buffer():
    cfg = tiny_config()
    state = build_state(cfg, build_model(cfg.model, cfg.data.scale), torch.device("cpu"))
    assert state.buffer is None
    assert isinstance(fixed_batch(), Batch)
