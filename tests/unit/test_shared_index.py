"""Every rank draws the same sampler index for each micro-batch (issue 16 section 2): no rank
waits for another's deeper rollout. The index stays uniform over the union of the loss windows,
and a resumed rank continues the shared stream, not a private one."""

from __future__ import annotations

import numpy as np
import torch

from rfsr_ray.models import build_model
from rfsr_ray.schedule import resolve_windows
from rfsr_ray.train.checkpoint import Progress, save_checkpoint
from rfsr_ray.train.context import LoopContext
from rfsr_ray.train.loop import _restore
from rfsr_ray.train.step import build_state
from tests.unit.helpers import tiny_config


def rank_state(cfg, rank):
    torch.manual_seed(0)
    return build_state(cfg, build_model(cfg.model, cfg.data.scale), torch.device("cpu"), rank)


def draws(state, count):
    return [state.losses.windows.sample(state.index_rng) for _ in range(count)]


def test_ranks_draw_the_same_indices_with_the_unchanged_distribution():
    cfg = tiny_config()
    ranks = [rank_state(cfg, rank) for rank in range(3)]
    sequences = [draws(state, 4000) for state in ranks]
    assert sequences[0] == sequences[1] == sequences[2]
    # The noise stays per rank.
    noise = [torch.randn(4, generator=state.generator) for state in ranks]
    assert not torch.equal(noise[0], noise[1])
    # Uniform over the union of the windows (structure 0-2, reward 5-7, Gram 6-7: indices
    # 0, 1, 2, 5, 6, 7), as resolve_windows defines it.
    expected = resolve_windows(cfg).probabilities
    assert set(np.flatnonzero(expected)) == {0, 1, 2, 5, 6, 7}
    observed = np.bincount(sequences[0], minlength=len(expected)) / len(sequences[0])
    np.testing.assert_allclose(observed, expected, atol=0.025)


def test_a_resumed_rank_continues_the_shared_index_stream(tmp_path, monkeypatch):
    cfg = tiny_config()
    rank0 = rank_state(cfg, 0)
    draws(rank0, 5)
    rank0.step = 5
    folder = save_checkpoint(tmp_path / "checkpoint_00000005", rank0, Progress(step=5), cfg)
    # Outside Ray Train: the folder the loop would find (it asks Ray Train and the run folder).
    monkeypatch.setattr("rfsr_ray.train.loop._resume_folder", lambda run_dir: str(folder))
    upcoming = draws(rank0, 20)
    for rank in (0, 1):  # every rank restores rank 0's checkpoint, as the loop does on resume
        resumed = rank_state(cfg, rank)
        progress = _restore(resumed, cfg, rank, Progress(), LoopContext(str(tmp_path)))
        assert progress.step == 5
        assert draws(resumed, 20) == upcoming
