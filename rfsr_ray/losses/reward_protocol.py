"""What every reward is: a module mapping SR images (and optionally HR, LR and prompts) to one
higher-is-better score per image, with `RewardInfo` describing it. pyiqa metrics
(`rfsr_ray.losses.rewards`) and ImageReward (`rfsr_ray.losses.imagereward`) implement it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class RewardInfo:
    name: str
    needs_hr: bool
    differentiable: bool
    score_range: str | None  # of the higher-is-better score, e.g. "~-1, 0" for negated gmsd


@runtime_checkable
class Reward(Protocol):
    info: RewardInfo

    def __call__(
        self,
        sr: torch.Tensor,
        hr: torch.Tensor | None = None,
        lr: torch.Tensor | None = None,
        prompt: list[str] | None = None,
    ) -> torch.Tensor: ...
