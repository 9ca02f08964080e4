"""Validation on a fixed held-out pair set: full N-step sampling of the EMA model, fidelity
metrics, every configured reward, the Gram distance to the base model, a labelled sample grid,
and the final bicubic | base | fine-tuned table.

Sampling is sharded: the set is cut into batches of `VALIDATION_BATCH`, each rank samples every
world-th batch with that batch's own seeded generator, and rank 0 gathers the outputs and scores
them. So no rank idles through a validation, and the numbers do not depend on the world size.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from rfsr_ray import seeds
from rfsr_ray.config import RFSRConfig
from rfsr_ray.errors import WeightsError
from rfsr_ray.images import (
    bicubic_upscale,
    centre_crop,
    labelled_grid,
    to_uint8,
)
from rfsr_ray.iqa import create_metric
from rfsr_ray.losses.gram import GramRegulariser
from rfsr_ray.losses.rfsr import RFSRLosses
from rfsr_ray.models.protocol import ISRDiffusionModel
from rfsr_ray.train.context import ValidationSet
from rfsr_ray.train.monitor import HackingMonitor

log = logging.getLogger("rfsr_ray.validate")
VALIDATION_BATCH = 4  # samples per model.sample call; each batch has its own noise stream

# Direction of each validation metric, for tables (↑ higher is better).
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "gram_to_base": False}

# Grids show HR images larger than this as centre crops of this side at full resolution, so
# that a 512² latent-family output is not shrunk into a thumbnail; smaller panels are enlarged
# by nearest neighbour to at least GRID_MIN_PANEL px.
GRID_CROP = 256
GRID_MIN_PANEL = 128
GRID_COLUMNS = ("LR bicubic", "base", "fine-tuned", "HR")


def sample_set(
    model: ISRDiffusionModel,
    lr_image: torch.Tensor,
    num_inference_steps: int,
    seed: int,
    reference: bool = False,
    rank: int = 0,
    world: int = 1,
) -> torch.Tensor | None:
    """SR of the whole validation set `lr_image` (N, 3, h, w), sampled as validation samples it:
    batch b (samples 4b..4b+3) from the generator `validation`/b, on rank b mod `world`. With
    `world` > 1 (inside torch.distributed) every rank must call it; rank 0 gets the whole set
    gathered in order, the other ranks None."""
    count = len(lr_image)
    batches = range(rank, -(-count // VALIDATION_BATCH), world)
    device = lr_image.device
    mine = {}
    for batch in batches:
        chunk = lr_image[batch * VALIDATION_BATCH : (batch + 1) * VALIDATION_BATCH]
        generator = seeds.torch_generator(seed, "validation", batch, device=device)
        mine[batch] = model.sample(chunk, num_inference_steps, generator, reference=reference)
    if world == 1:
        return torch.cat([mine[batch] for batch in sorted(mine)])
    gathered: list | None = [None] * world if rank == 0 else None
    torch.distributed.gather_object({b: x.cpu() for b, x in mine.items()}, gathered, dst=0)
    if rank != 0:
        return None
    merged = {batch: sr for shard in gathered for batch, sr in shard.items()}
    return torch.cat([merged[batch] for batch in sorted(merged)]).to(device)


class Validator:
    """Computes validation metrics; the base model's outputs are sampled once and cached.

    Every rank of a run holds one and calls `base` and `run` at the same steps (sampling is a
    collective, `sample_set`); only rank 0 (`scoring`) scores, draws and returns metrics.
    """

    def __init__(
        self,
        cfg: RFSRConfig,
        val_set: ValidationSet,
        losses: RFSRLosses | None,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.cfg = cfg
        self.lr, self.hr = val_set.tensors(device)
        self.device = device
        self.rank, self.world = rank, world
        self.scoring = rank == 0
        self.base_sampled = False
        self.last: dict[str, float] | None = None  # metrics of the latest `run` (rank 0)
        if not self.scoring:
            return
        self.psnr = create_metric("psnr", device)
        self.ssim = create_metric("ssim", device)
        self.rewards = list(losses.rewards) if losses is not None else []
        self.gram = losses.gram if losses is not None else None
        if losses is not None and self.gram is None and cfg.losses.monitor.gram_to_base:
            self.gram = _measuring_gram(cfg, device)
        monitor = cfg.losses.monitor
        # Held-out metrics beyond PSNR/SSIM (e.g. a no-reference one), for the hacking monitor.
        extra = [n for n in cfg.held_out_metrics() if n not in ("psnr", "ssim")]
        self.held_out = {name: create_metric(name, device) for name in extra}
        self.lower_better = {name: bool(m.lower_better) for name, m in self.held_out.items()}
        reward = self.rewards and cfg.train.loss == "rfsr" and monitor.enabled
        self.monitor = HackingMonitor(monitor) if reward else None
        # The baseline every SR model must beat, scored once (no Gram distance: not a model output).
        self.bicubic_sr = bicubic_upscale(self.lr, tuple(self.hr.shape[-2:]))
        self.bicubic_scores = self.scores(self.bicubic_sr)
        self.bicubic_metrics = _means(self.bicubic_scores)
        # The base never changes: sampled and scored at the first validation, then reused.
        self.base_sr: torch.Tensor | None = None
        self.base_scores: dict[str, np.ndarray] | None = None  # per sample, like bicubic_scores
        self.base_metrics: dict[str, float] | None = None
        self.last_scores: dict[str, np.ndarray] | None = None  # per sample, of the latest `run`

    def _sample(self, model: ISRDiffusionModel, reference: bool) -> torch.Tensor | None:
        # Seeded per batch: every validation sees the same x_T, so changes come from the weights.
        return sample_set(
            model,
            self.lr,
            self.cfg.schedule.num_inference_steps,
            self.cfg.train.seed,
            reference,
            self.rank,
            self.world,
        )

    @torch.no_grad()
    def scores(self, sr: torch.Tensor) -> dict[str, np.ndarray]:
        """Per-sample values, each (N,) float64: psnr (dB), ssim, the held-out metrics, and
        `reward_<name>` for each reward term (higher is better). `sr`: (N, 3, H, W) in [0, 1]."""
        values = {"psnr": self.psnr(sr, self.hr), "ssim": self.ssim(sr, self.hr)}
        for name, metric in self.held_out.items():
            values[name] = metric(*((sr, self.hr) if metric.metric_mode == "FR" else (sr,)))
        for term in self.rewards:
            values[f"reward_{term.cfg.name}"] = term.reward(sr, hr=self.hr, lr=self.lr)
        return {
            name: value.detach().reshape(len(sr), -1).mean(dim=1).double().cpu().numpy()
            for name, value in values.items()
        }

    @torch.no_grad()
    def _summary(self, scores: dict[str, np.ndarray], sr: torch.Tensor) -> dict[str, float]:
        """The means of `scores` (of `sr`), plus `gram_to_base` once the base has been sampled."""
        values = _means(scores)
        if self.gram is not None and self.base_sr is not None:
            values["gram_to_base"] = float(self.gram(sr, self.base_sr))
        return values

    def base(self, model: ISRDiffusionModel) -> dict[str, float] | None:
        """Metrics of the frozen original model: sampled and scored at the first call only
        (None on ranks other than 0). Its `gram_to_base` is 0 by definition."""
        if not self.base_sampled:
            self.base_sr = self._sample(model, reference=True)
            self.base_sampled = True
            if self.scoring:
                self.base_scores = self.scores(self.base_sr)
                self.base_metrics = self._summary(self.base_scores, self.base_sr)
        return self.base_metrics if self.scoring else None

    def run(self, model: ISRDiffusionModel) -> tuple[dict[str, float], np.ndarray] | None:
        """Metrics of `model` as it is now (load EMA weights before calling) and a sample grid
        (None on ranks other than 0).

        The Gram distance and the grid compare against the base outputs, so call `base` first.
        """
        if not self.base_sampled:
            raise RuntimeError("sample the base model (Validator.base) before validating")
        sr = self._sample(model, reference=False)
        if not self.scoring:
            return None
        self.last_scores = self.scores(sr)
        self.last = self._summary(self.last_scores, sr)
        return self.last, self.grid(sr, self.last_scores)

    def grid(self, sr: torch.Tensor, sr_scores: dict[str, np.ndarray], rows: int = 4) -> np.ndarray:
        """The first `rows` samples as (H, W, 3) uint8: columns LR bicubic | base | fine-tuned |
        HR under a header, each row captioned with its PSNR and first reward, base → fine-tuned.
        `sr_scores`: `scores(sr)`."""
        if self.base_sr is None or self.base_scores is None:
            raise RuntimeError("sample the base model (Validator.base) before drawing a grid")
        images = (self.bicubic_sr, self.base_sr, sr, self.hr)
        panels, title = grid_panels([to_uint8(x[:rows]) for x in images])
        reward = f"reward_{self.rewards[0].cfg.name}" if self.rewards else None
        captions = [
            row_caption(self.base_scores, sr_scores, index, reward) for index in range(len(panels))
        ]
        title += " · captions: base → fine-tuned"
        return labelled_grid(panels, GRID_COLUMNS, captions, title, min_panel=GRID_MIN_PANEL)

    def final_rows(self) -> dict[str, list]:
        """The final table as columns (for `mlflow.log_table`): `metric` (name and ↑/↓),
        `bicubic`, `base`, `fine-tuned`, `delta` (fine-tuned − base); None where a metric does
        not apply (the bicubic baseline has no Gram distance). Needs `base` and `run` first."""
        if self.base_metrics is None or self.last is None:
            raise RuntimeError("validate (Validator.base, then Validator.run) before the table")
        directions = lower_is_better(self.lower_better)
        columns: dict[str, list] = {
            "metric": [], "bicubic": [], "base": [], "fine-tuned": [], "delta": []
        }  # fmt: skip
        for name, tuned in self.last.items():
            base = self.base_metrics.get(name)
            columns["metric"].append(f"{name} {'↓' if directions.get(name) else '↑'}")
            columns["bicubic"].append(self.bicubic_metrics.get(name))
            columns["base"].append(base)
            columns["fine-tuned"].append(tuned)
            columns["delta"].append(None if base is None else tuned - base)
        return columns

    def final_table(self) -> str:
        """Markdown: metric | bicubic | base | fine-tuned | Δ (fine-tuned − base), ↑/↓ marking
        the better direction; – where a metric does not apply."""
        columns = self.final_rows()
        lines = [
            "| metric | bicubic | base | fine-tuned | Δ (fine-tuned − base) |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in zip(*columns.values(), strict=True):
            name, *values, delta = row
            cells = ["–" if v is None else f"{v:.4f}" for v in values]
            cells.append("–" if delta is None else f"{delta:+.4f}")
            lines.append(f"| {name} | {' | '.join(cells)} |")
        return "\n".join(lines)

    def held_out_values(self, metrics: dict[str, float]) -> dict[str, float]:
        """The monitor's held-out metrics from `metrics`, negated where lower is better."""
        names = [n for n in self.cfg.held_out_metrics() if n in metrics]
        return {n: -metrics[n] if self.lower_better.get(n, False) else metrics[n] for n in names}


def lower_is_better(lower_better: dict[str, bool] | None = None) -> dict[str, bool]:
    """Which metrics are better lower: `HIGHER_IS_BETTER`'s, updated with `lower_better`."""
    directions = {name: not higher for name, higher in HIGHER_IS_BETTER.items()}
    return directions | (lower_better or {})


def _means(scores: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: float(values.mean()) for name, values in scores.items()}


def grid_panels(
    columns: list[np.ndarray], crop: int = GRID_CROP
) -> tuple[list[list[np.ndarray]], str]:
    """Rows of panels from equally sized uint8 (N, H, W, 3) columns, and a line saying what they
    show: the whole images, or their central `crop` × `crop` at full resolution when H or W is
    larger (never shrunk)."""
    height, width = columns[0].shape[1:3]
    if max(height, width) > crop:
        side = min(crop, height), min(crop, width)
        title = f"centre {side[1]}x{side[0]} crops of {width}x{height} px, full resolution"
        columns = [np.stack([centre_crop(image, crop) for image in column]) for column in columns]
    else:
        title = f"whole {width}x{height} px images"
        if max(height, width) < GRID_MIN_PANEL:
            title += ", enlarged (nearest neighbour)"
    return [list(panels) for panels in zip(*columns, strict=True)], title


def row_caption(
    base: dict[str, np.ndarray], tuned: dict[str, np.ndarray], index: int, reward: str | None
) -> str:
    """`PSNR 24.10 → 24.30 dB · gmsd -0.1602 → -0.1550` for sample `index`, base → fine-tuned;
    `reward` is a `reward_<name>` key of both score dicts, or None for PSNR alone."""
    text = f"PSNR {base['psnr'][index]:.2f} → {tuned['psnr'][index]:.2f} dB"
    if reward is not None:
        name = reward.removeprefix("reward_")
        text += f" · {name} {base[reward][index]:.4f} → {tuned[reward][index]:.4f}"
    return text


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


def _measuring_gram(cfg: RFSRConfig, device: torch.device) -> GramRegulariser | None:
    """With the Gram regulariser off (an ablation's `no_gram`) and `losses.monitor.gram_to_base`
    on, validation still reports `gram_to_base`, through the VGG19 that `losses.gram` names and
    the run's seed, so the number is comparable with a run that trains with it; None when that
    VGG cannot be loaded."""
    try:
        return GramRegulariser(cfg.losses.gram, cfg.train.seed).to(device).eval()
    except WeightsError as error:
        log.info("validation reports no gram_to_base (Gram regulariser off): %s", error)
        return None
