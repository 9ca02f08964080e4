"""Validation on a fixed held-out pair set: full N-step sampling of the EMA model, fidelity
metrics, every configured reward, the Gram distance to the base model, and a sample grid."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rfsr_ray import seeds
from rfsr_ray.config import RFSRConfig
from rfsr_ray.images import image_grid, to_tensor, to_uint8
from rfsr_ray.iqa import create_metric
from rfsr_ray.losses.rfsr import RFSRLosses
from rfsr_ray.models.protocol import ISRDiffusionModel
from rfsr_ray.train.monitor import HackingMonitor

# Direction of each validation metric, for tables (↑ higher is better).
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "gram_to_base": False}


@dataclass(frozen=True)
class ValidationSet:
    """lr: uint8 (N, h, w, 3); hr: uint8 (N, h·s, w·s, 3)."""

    lr: np.ndarray
    hr: np.ndarray

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return to_tensor(self.lr, device), to_tensor(self.hr, device)


class Validator:
    """Computes validation metrics; the base model's outputs are sampled once and cached."""

    def __init__(
        self,
        cfg: RFSRConfig,
        val_set: ValidationSet,
        losses: RFSRLosses | None,
        device: torch.device,
    ) -> None:
        self.cfg = cfg
        self.lr, self.hr = val_set.tensors(device)
        self.device = device
        self.psnr = create_metric("psnr", device)
        self.ssim = create_metric("ssim", device)
        self.rewards = list(losses.rewards) if losses is not None else []
        self.gram = losses.gram if losses is not None else None
        monitor = cfg.losses.monitor
        # Held-out metrics beyond PSNR/SSIM (e.g. a no-reference one), for the hacking monitor.
        extra = [n for n in cfg.held_out_metrics() if n not in ("psnr", "ssim")]
        self.held_out = {name: create_metric(name, device) for name in extra}
        self.lower_better = {name: bool(m.lower_better) for name, m in self.held_out.items()}
        reward = self.rewards and cfg.train.loss == "rfsr" and monitor.enabled
        self.monitor = HackingMonitor(monitor) if reward else None
        # The base never changes: sampled and scored at the first validation, then reused.
        self.base_sr: torch.Tensor | None = None
        self.base_metrics: dict[str, float] | None = None
        self.last: dict[str, float] | None = None  # metrics of the latest `run`

    def _sample(self, model: ISRDiffusionModel, reference: bool) -> torch.Tensor:
        # A fixed seed: every validation sees the same x_T, so changes come from the weights.
        generator = seeds.torch_generator(self.cfg.train.seed, "validation", device=self.device)
        outputs = []
        for start in range(0, len(self.lr), 4):
            outputs.append(
                model.sample(
                    self.lr[start : start + 4],
                    self.cfg.schedule.num_inference_steps,
                    generator,
                    reference=reference,
                )
            )
        return torch.cat(outputs)

    @torch.no_grad()
    def metrics(self, sr: torch.Tensor) -> dict[str, float]:
        values = {
            "psnr": float(self.psnr(sr, self.hr).mean()),
            "ssim": float(self.ssim(sr, self.hr).mean()),
        }
        for name, metric in self.held_out.items():
            args = (sr, self.hr) if metric.metric_mode == "FR" else (sr,)
            values[name] = float(metric(*args).mean())
        for term in self.rewards:
            values[f"reward_{term.cfg.name}"] = float(
                term.reward(sr, hr=self.hr, lr=self.lr).mean()
            )
        if self.gram is not None and self.base_sr is not None:
            values["gram_to_base"] = float(self.gram(sr, self.base_sr))
        return values

    def base(self, model: ISRDiffusionModel) -> dict[str, float]:
        """Metrics of the frozen original model: sampled and scored at the first call only.

        Its `gram_to_base` is 0 by definition (the base against itself).
        """
        if self.base_metrics is None:
            self.base_sr = self._sample(model, reference=True)
            self.base_metrics = self.metrics(self.base_sr)
        return self.base_metrics

    def run(self, model: ISRDiffusionModel) -> tuple[dict[str, float], np.ndarray]:
        """Metrics of `model` as it is now (load EMA weights before calling) and a sample grid.

        The Gram distance and the grid compare against the base outputs, so call `base` first.
        """
        if self.base_sr is None:
            raise RuntimeError("sample the base model (Validator.base) before validating")
        sr = self._sample(model, reference=False)
        self.last = self.metrics(sr)
        return self.last, self.grid(sr)

    def grid(self, sr: torch.Tensor, rows: int = 4) -> np.ndarray:
        """Rows of LR-upscaled | base | current | HR as a (H, W, 3) uint8 image."""
        if self.base_sr is None:
            raise RuntimeError("sample the base model (Validator.base) before drawing a grid")
        upscaled = F.interpolate(self.lr, size=self.hr.shape[-2:], mode="bicubic")
        columns = [to_uint8(x[:rows]) for x in (upscaled, self.base_sr, sr, self.hr)]
        return image_grid([list(panels) for panels in zip(*columns, strict=True)])

    def held_out_values(self, metrics: dict[str, float]) -> dict[str, float]:
        """The monitor's held-out metrics from `metrics`, negated where lower is better."""
        names = [n for n in self.cfg.held_out_metrics() if n in metrics]
        return {n: -metrics[n] if self.lower_better.get(n, False) else metrics[n] for n in names}


def gains(
    base: dict[str, float], current: dict[str, float], lower_better: dict[str, bool]
) -> dict[str, float]:
    """Improvement of each metric over the base: positive is better for every metric (those
    marked in `lower_better` are flipped). The base's Gram distance is 0 by definition, so it
    has none."""
    return {
        name: (base[name] - value) if lower_better.get(name) else (value - base[name])
        for name, value in current.items()
        if name in base and name != "gram_to_base"
    }


def comparison_table(
    base: dict[str, float], tuned: dict[str, float], lower_better: dict[str, bool] | None = None
) -> str:
    """Markdown table: metric | base | fine-tuned | delta, with ↑/↓ direction."""
    lines = ["| metric | base | fine-tuned | Δ |", "|---|---:|---:|---:|"]
    directions = {name: not higher for name, higher in HIGHER_IS_BETTER.items()}
    directions.update(lower_better or {})
    for name in tuned:
        arrow = "↓" if directions.get(name, False) else "↑"
        before = base.get(name, float("nan"))
        lines.append(
            f"| {name} {arrow} | {before:.4f} | {tuned[name]:.4f} | {tuned[name] - before:+.4f} |"
        )
    return "\n".join(lines)
