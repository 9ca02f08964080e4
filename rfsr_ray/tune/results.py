"""What a sweep leaves behind: the per-trial table (CSV, Markdown), the fidelity–perception plot
with its Pareto front, the objective heat map of grid sweeps, and the best trial's config."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rfsr_ray.config import RFSRConfig, build_config
from rfsr_ray.tune.space import describe, trial_config


@dataclass(frozen=True)
class TrialRow:
    trial_id: str
    params: dict[str, Any]  # the sampled sweep parameters
    structure_end: int  # resolved windows of the trial's config
    reward_start: int
    gram_weight: float
    reward_gain: float
    psnr_change: float  # dB, fine-tuned − base on the held-out set
    gram_distance: float
    objective: float
    steps: int
    asha_stopped: bool
    error: str | None
    # Every number of the trial's last report (`val_*`, `seconds_per_step`), and its validation
    # history: one {step, metric: value} per report that carried a validation.
    final: dict[str, float] = field(default_factory=dict)
    history: tuple[dict[str, float], ...] = ()

    @property
    def split_label(self) -> str:
        return f"{self.structure_end}|{self.reward_start}"


def trial_row(
    cfg: RFSRConfig,
    trial_id: str,
    params: dict[str, Any],
    metrics: dict[str, Any],
    error: str | None,
    history: Sequence[dict[str, Any]] = (),
) -> TrialRow:
    """One table row from a trial's parameters, its last report to Tune and (optionally) every
    report it made."""
    trial_cfg = trial_config(cfg, params)
    split = trial_cfg.schedule.split
    structure_end = split.structure_end if split else trial_cfg.losses.structure.window[1]
    reward_start = split.reward_start if split else trial_cfg.losses.reward.window[0]
    steps = int(metrics.get("step", 0))
    return TrialRow(
        trial_id=trial_id,
        params=dict(params),
        structure_end=structure_end,
        reward_start=reward_start,
        gram_weight=trial_cfg.losses.gram.weight,
        reward_gain=_number(metrics.get("val_reward_gain")),
        psnr_change=_number(metrics.get("val_psnr_gain")),
        gram_distance=_number(metrics.get("val_gram_to_base")),
        objective=_number(metrics.get("val_objective")),
        steps=steps,
        # A trial that ended without error before train.steps was stopped by the scheduler.
        asha_stopped=error is None and 0 < steps < cfg.train.steps,
        error=error,
        final=_numbers(metrics),
        history=tuple(
            {"step": float(report["step"]), **_numbers(report)}
            for report in history
            if "step" in report and "val_objective" in _numbers(report)
        ),
    )


def _numbers(report: dict[str, Any]) -> dict[str, float]:
    """The validation numbers and step time of one report (finite floats only)."""
    numbers = {}
    for key, value in report.items():
        if not (key.startswith("val_") or key == "seconds_per_step"):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            numbers[key] = number
    return numbers


def _number(value: Any) -> float:
    return float(value) if value is not None else math.nan


def best_row(rows: Sequence[TrialRow]) -> TrialRow | None:
    """Highest final objective among trials that ran to the end (else among any that reported):
    a trial stopped early is judged on fewer steps, so it is not preferred."""
    finite = [r for r in rows if r.error is None and math.isfinite(r.objective)]
    complete = [r for r in finite if not r.asha_stopped]
    pool = complete or finite
    return max(pool, key=lambda r: r.objective) if pool else None


COLUMNS = (
    "trial", "structure_end", "reward_start", "gram_weight", "params", "reward_gain",
    "psnr_change_db", "gram_distance", "objective", "steps", "asha_stopped", "status",
)  # fmt: skip


def _cells(row: TrialRow) -> list[Any]:
    return [
        row.trial_id, row.structure_end, row.reward_start, row.gram_weight, describe(row.params),
        row.reward_gain, row.psnr_change, row.gram_distance, row.objective, row.steps,
        row.asha_stopped, "error: " + row.error if row.error else "ok",
    ]  # fmt: skip


def write_csv(rows: Iterable[TrialRow], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(_cells(row) for row in rows)
    return path


def markdown_table(rows: Sequence[TrialRow], best: TrialRow | None) -> str:
    def text(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|"
        + "|".join("---" if c in ("trial", "params", "status") else "---:" for c in COLUMNS)
        + "|",
    ]
    for row in rows:
        cells = [text(cell) for cell in _cells(row)]
        if best is not None and row.trial_id == best.trial_id:
            cells[0] = f"**{cells[0]}** (best)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pareto_front(rows: Sequence[TrialRow]) -> list[TrialRow]:
    """Trials no other trial beats on both reward gain and PSNR change (both maximised)."""
    points = [r for r in rows if math.isfinite(r.reward_gain) and math.isfinite(r.psnr_change)]

    def dominated(row: TrialRow) -> bool:
        return any(
            other.reward_gain >= row.reward_gain
            and other.psnr_change >= row.psnr_change
            and (other.reward_gain > row.reward_gain or other.psnr_change > row.psnr_change)
            for other in points
        )

    return sorted((r for r in points if not dominated(r)), key=lambda r: r.psnr_change)


def plot_fidelity_perception(rows: Sequence[TrialRow], path: Path) -> Path | None:
    """PSNR change vs reward gain, one point per trial coloured by Gram weight, Pareto front
    joined and ringed. None when no trial reported both numbers."""
    points = [r for r in rows if math.isfinite(r.reward_gain) and math.isfinite(r.psnr_change)]
    if not points:
        return None
    plt = pyplot()
    from matplotlib.colors import LogNorm, Normalize

    weights = [r.gram_weight for r in points]
    positive = min(weights) > 0 and max(weights) > min(weights)
    norm = LogNorm(min(weights), max(weights)) if positive else Normalize()
    figure, axes = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    scatter = axes.scatter(
        [r.psnr_change for r in points], [r.reward_gain for r in points],
        c=weights, norm=norm, cmap="viridis", s=60, zorder=3, edgecolors="black",
    )  # fmt: skip
    front = pareto_front(points)
    axes.plot(
        [r.psnr_change for r in front], [r.reward_gain for r in front], "r--", lw=1,
        marker="o", ms=13, mfc="none", mec="red", label="Pareto front", zorder=2,
    )  # fmt: skip
    for row in points:
        axes.annotate(row.trial_id[-5:], (row.psnr_change, row.reward_gain), fontsize=7,
                      xytext=(4, 4), textcoords="offset points")  # fmt: skip
    figure.colorbar(scatter, ax=axes, label="Gram weight")
    axes.axhline(0, color="grey", lw=0.5)
    axes.axvline(0, color="grey", lw=0.5)
    axes.set_xlabel("PSNR change vs base (dB) → higher fidelity")
    axes.set_ylabel("held-out reward gain vs base → better perception")
    axes.set_title("Fidelity–perception plane, one point per trial")
    axes.legend(loc="best")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_objective_heatmap(rows: Sequence[TrialRow], path: Path) -> Path | None:
    """Mean final objective over split × Gram weight (grid sweeps). None without finite values."""
    finite = [r for r in rows if math.isfinite(r.objective)]
    if not finite:
        return None
    import numpy as np

    splits = sorted({(r.structure_end, r.reward_start) for r in finite})
    weights = sorted({r.gram_weight for r in finite})
    grid = np.full((len(splits), len(weights)), np.nan)
    for i, split in enumerate(splits):
        for j, weight in enumerate(weights):
            values = [
                r.objective
                for r in finite
                if (r.structure_end, r.reward_start) == split and r.gram_weight == weight
            ]
            if values:
                grid[i, j] = float(np.mean(values))
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(1.6 * len(weights) + 3, 0.7 * len(splits) + 2), dpi=100)
    image = axes.imshow(grid, cmap="magma", aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            axes.text(j, i, f"{value:.3g}", ha="center", va="center", color="cyan", fontsize=8)
    axes.set_xticks(range(len(weights)), [f"{w:.3g}" for w in weights])
    axes.set_yticks(range(len(splits)), [f"{e}|{s}" for e, s in splits])
    axes.set_xlabel("Gram weight")
    axes.set_ylabel("split: structure_end | reward_start")
    axes.set_title("Objective (mean over repeats)")
    figure.colorbar(image, ax=axes, label="objective")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def write_best_config(cfg: RFSRConfig, best: TrialRow, path: Path) -> Path:
    """The best trial's fine-tune config, ready for pipelines/finetune.py."""
    tree = trial_config(cfg, best.params).to_dict()
    tree["output"]["run_name"] = f"{cfg.tune.name}_best"
    tree["tune"] = build_config().tune.model_dump(mode="json")  # a fine-tune does not sweep
    best_cfg = build_config(tree)
    header = (
        f"# python pipelines/finetune.py --config {path}\n"
        f"# Best trial {best.trial_id} of sweep {cfg.tune.name!r} ({describe(best.params)}): "
        f"objective {best.objective:.4g}, reward gain {best.reward_gain:.4g}, "
        f"PSNR change {best.psnr_change:+.3f} dB after {best.steps} steps.\n"
        "# Raise train.steps for the full fine-tune.\n"
    )
    path.write_text(header + best_cfg.to_yaml())
    return path
