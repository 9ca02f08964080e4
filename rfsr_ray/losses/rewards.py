"""Differentiable quality rewards (higher is better) and their loss forms.

A reward maps `(sr, hr=None, lr=None, prompt=None)` with images (B, 3, H, W) in [0, 1] to
(B,) fp32 scores. pyiqa metrics are wrapped by name; `lower_better` metrics are negated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rfsr_ray import iqa, seeds
from rfsr_ray.config import RewardConfig
from rfsr_ray.errors import ConfigError
from rfsr_ray.losses.reward_protocol import Reward, RewardInfo
from rfsr_ray.score_range import higher_better_range, normalisation_bounds


class PyiqaReward(nn.Module):
    """A pyiqa metric as a higher-is-better differentiable reward."""

    def __init__(
        self,
        name: str,
        device: torch.device | str = "cpu",
        normalize: bool = False,
        min_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        # Some metrics crop at random (MANIQA, LIQE): each call draws from its own seeded
        # stream, so runs repeat exactly without touching the caller's RNG.
        self.seed, self.calls, self.min_size = seed, 0, min_size
        iqa.known_metric(name, "losses.reward.terms")
        metric = iqa.create_metric(name, device, as_loss=True)
        self.metric = metric.requires_grad_(False)
        self.sign = -1.0 if metric.lower_better else 1.0
        score_range = higher_better_range(metric.score_range, metric.lower_better)
        # Higher-is-better score s ↦ (s − low) / (high − low): rewards on one scale, so their
        # weights and a hinge margin mean the same for every metric. The config refuses a
        # metric without two finite bounds already (RewardConfig); this covers direct builds.
        self.offset, self.span = 0.0, 1.0
        if normalize:
            self.offset, high = normalisation_bounds(name, metric.score_range, metric.lower_better)
            self.span = high - self.offset
            score_range = "0, 1"
        self.info = RewardInfo(name, metric.metric_mode == "FR", True, score_range)

    def forward(
        self,
        sr: torch.Tensor,
        hr: torch.Tensor | None = None,
        lr: torch.Tensor | None = None,
        prompt: list[str] | None = None,
    ) -> torch.Tensor:
        if self.info.needs_hr and hr is None:
            raise ValueError(f"reward {self.info.name!r} is full-reference and needs `hr`")
        images = [self._fit(x.float()) for x in ((sr, hr) if self.info.needs_hr else (sr,))]
        devices = [sr.device] if sr.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seeds.derive_seed(self.seed, f"reward.{self.info.name}", self.calls))
            self.calls += 1
            score = self.metric(*images)
        score = self.sign * score.reshape(sr.shape[0], -1).mean(dim=1).float()
        return (score - self.offset) / self.span

    def _fit(self, image: torch.Tensor) -> torch.Tensor:
        """Upsample (differentiably) so the shorter side is at least `min_size`: metrics with a
        fixed input size (224 for MANIQA's crops) refuse smaller images."""
        shorter = min(image.shape[-2:])
        if self.min_size is None or shorter >= self.min_size:
            return image
        factor = self.min_size / shorter
        size = [max(self.min_size, round(side * factor)) for side in image.shape[-2:]]
        return F.interpolate(image, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def check_differentiable(reward: Reward, size: int = 64) -> None:
    """Refuse a reward whose score has no finite, non-zero gradient w.r.t. the SR image."""
    generator = torch.Generator().manual_seed(0)
    sr = torch.rand(2, 3, size, size, generator=generator).requires_grad_(True)
    hr = torch.rand(2, 3, size, size, generator=generator)
    try:
        reward(sr, hr=hr).sum().backward()
    except RuntimeError as error:
        raise ConfigError(
            f"reward {reward.info.name!r} has no gradient ({error}); it cannot be optimised. "
            f"Use a differentiable metric, e.g. {', '.join(iqa.WEIGHT_FREE_DIFFERENTIABLE)}"
        ) from None
    if sr.grad is None or not torch.isfinite(sr.grad).all() or not sr.grad.abs().sum() > 0:
        raise ConfigError(
            f"reward {reward.info.name!r} gives no usable gradient (None, zero or non-finite); "
            "choose a differentiable metric"
        )


class RewardTerm(nn.Module):
    """One weighted reward loss: `hinge` = relu(margin − r) (the reference's) or `linear` = −r."""

    def __init__(self, reward: Reward, cfg: RewardConfig) -> None:
        super().__init__()
        self.reward = reward
        self.cfg = cfg

    def forward(
        self,
        sr: torch.Tensor,
        hr: torch.Tensor | None = None,
        lr: torch.Tensor | None = None,
        prompt: list[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (weighted scalar loss, (B,) detached scores)."""
        score = self.reward(sr, hr=hr, lr=lr, prompt=prompt)
        per_sample = torch.relu(self.cfg.margin - score) if self.cfg.form == "hinge" else -score
        return self.cfg.weight * per_sample.mean(), score.detach()


def build_reward(
    cfg: RewardConfig, device: torch.device | str = "cpu", seed: int = 0
) -> RewardTerm:
    """A reward term by pyiqa name (or `imagereward`), refused at build time when it has no
    gradient."""
    reward: Reward
    if cfg.name == "imagereward":
        from rfsr_ray.losses.imagereward import build_imagereward

        if cfg.normalize:  # ImageReward's scores are z-scored, with no range: this raises
            normalisation_bounds(cfg.name, None, lower_better=False)

        reward = build_imagereward(
            cfg.weights, cfg.tokenizer, cfg.prompt, cfg.prompt_drop_prob, device, seed
        )
    else:
        reward = PyiqaReward(cfg.name, device, cfg.normalize, cfg.min_size, seed)
    check_differentiable(reward)
    return RewardTerm(reward, cfg)
