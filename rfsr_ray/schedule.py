"""Timestep-aware loss windows and index sampling (METHOD.md sections 2-3).

Windows are inclusive index ranges over the N-step sampler schedule; index 0 is the noisiest step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from rfsr_ray.config import LossesConfig, ScheduleConfig
from rfsr_ray.errors import ConfigError

if TYPE_CHECKING:
    import torch

LOSS_NAMES = ("structure", "reward", "gram")


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


def resolve_windows(losses: LossesConfig, schedule: ScheduleConfig) -> LossWindows:
    """Windows of the enabled losses (the `split` shorthand wins when set), validated."""
    steps = schedule.num_inference_steps
    windows: dict[str, tuple[int, int]] = {}
    for name in LOSS_NAMES:
        loss = getattr(losses, name)
        if not loss.enabled:
            continue
        window = tuple(loss.window)
        if schedule.split is not None:
            split = schedule.split
            window = (
                (0, split.structure_end) if name == "structure" else (split.reward_start, steps - 1)
            )
        if not 0 <= window[0] <= window[1] < steps:
            raise ConfigError(
                f"losses.{name}.window={list(window)} must be ascending and inside [0, {steps - 1}]"
                f" for schedule.num_inference_steps={steps}, e.g. [0, {steps // 2}]"
            )
        windows[name] = window
    if not windows:
        raise ConfigError(
            "no RFSR loss is enabled; enable at least one of losses.structure / losses.reward / "
            "losses.gram (or use train.objective=denoise)"
        )
    return LossWindows(windows, _probabilities(windows, steps, schedule.window_weights))


def _probabilities(
    windows: dict[str, tuple[int, int]], steps: int, weights: dict[str, float]
) -> np.ndarray:
    # Uniform over the union of windows; an index covered by several windows takes the largest
    # of their weights (default 1), so overlapping windows do not double-count.
    per_index = np.zeros(steps)
    for name, (low, high) in windows.items():
        per_index[low : high + 1] = np.maximum(per_index[low : high + 1], weights.get(name, 1.0))
    if per_index.sum() <= 0:
        raise ConfigError(f"schedule.window_weights={weights} leave no index to sample; use > 0")
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
