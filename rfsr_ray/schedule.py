"""Timestep-aware loss windows and index sampling (METHOD.md sections 2-3).

Windows are inclusive index ranges over the N-step sampler schedule; index 0 is the noisiest step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from rfsr_ray.config import RFSRConfig

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LossWindows:
    """Resolved windows of the enabled losses, plus the per-index sampling distribution."""

    windows: dict[str, tuple[int, int]]
    probabilities: np.ndarray  # (N,) float64, sums to 1

    def active(self, index: int) -> tuple[str, ...]:
        """Names of the losses whose window contains `index`."""
        return tuple(n for n, (lo, hi) in self.windows.items() if lo <= index <= hi)

    def sample(self, rng: np.random.Generator) -> int:
        return int(rng.choice(len(self.probabilities), p=self.probabilities))


def resolve_windows(cfg: RFSRConfig) -> LossWindows:
    """Windows of the enabled losses (validated by the config schema) and the index distribution."""
    windows = cfg.loss_windows()
    return LossWindows(
        windows,
        _probabilities(windows, cfg.schedule.num_inference_steps, cfg.schedule.window_weights),
    )


def _probabilities(
    windows: dict[str, tuple[int, int]], steps: int, weights: dict[str, float]
) -> np.ndarray:
    # Uniform over the union of windows; an index covered by several windows takes the largest
    # of their weights (default 1), so overlapping windows do not double-count.
    per_index = np.zeros(steps)
    for name, (low, high) in windows.items():
        per_index[low : high + 1] = np.maximum(per_index[low : high + 1], weights.get(name, 1.0))
    return per_index / per_index.sum()


def describe_timesteps(
    timesteps: Sequence[int] | torch.Tensor,
    head: int = 3,
    tail: int = 3,
    *,
    scheduler_name: str | None = None,
) -> str:
    """The index → timestep map RFSR trains on, for a log line or a run record, e.g.
    "0→981, 1→961, 2→941 … 47→41, 48→21, 49→1 (50 steps, DDIMScheduler)".

    `timesteps`: the N-step schedule, index 0 the noisiest; the first `head` and last `tail`
    entries are shown (all of them when N ≤ head + tail).
    """
    values = [int(t) for t in timesteps]
    pairs = [f"{index}→{value}" for index, value in enumerate(values)]
    if len(pairs) > head + tail:
        ends = (", ".join(pairs[:head]), "…", ", ".join(pairs[len(pairs) - tail :]))
        shown = " ".join(part for part in ends if part)
    else:
        shown = ", ".join(pairs)
    suffix = f", {scheduler_name}" if scheduler_name else ""
    return f"{shown} ({len(values)} steps{suffix})"
