"""Reward-hacking monitor: the optimised reward rising while metrics nobody optimises fall.

Pure bookkeeping over validation results (no tensors), so it is tested on scripted trajectories
and runs unchanged on rank 0 of any training run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rfsr_ray.config import HackingMonitorConfig


@dataclass(frozen=True)
class HackingSignal:
    fired: bool  # `patience` suspicious validations in a row
    streak: int  # consecutive suspicious validations so far
    falling: dict[str, float] = field(default_factory=dict)  # held-out metric → relative fall


@dataclass
class HackingMonitor:
    """Feed it each validation's optimised reward and held-out metrics (all higher-is-better;
    negate lower-is-better metrics before), in order."""

    cfg: HackingMonitorConfig
    streak: int = 0
    previous: tuple[float, dict[str, float]] | None = None

    def update(self, reward: float, held_out: dict[str, float]) -> HackingSignal:
        falling: dict[str, float] = {}
        if self.previous is not None:
            last_reward, last_held_out = self.previous
            if reward > last_reward:
                for name, value in held_out.items():
                    before = last_held_out.get(name)
                    if before is None:
                        continue
                    fall = (before - value) / max(abs(before), 1e-8)
                    if fall > self.cfg.threshold:
                        falling[name] = fall
        self.previous = (reward, dict(held_out))
        self.streak = self.streak + 1 if falling else 0
        return HackingSignal(self.streak >= self.cfg.patience, self.streak, falling)
