"""Ablation studies: named variants of one fine-tune config (`tune.variants`), each trained with
every seed of `tune.space.seed`, compared with the baseline variant by per-seed paired
differences and their confidence intervals. The trials run on the sweep machinery
(`rfsr_ray.tune.sweep`); this module defines the default study and turns the trials' rows into
`ablation.md` / `.csv`, `per_seed.csv` and two plots."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rfsr_ray.config import RFSRConfig, build_config
from rfsr_ray.config.schema import SchedulerConfig
from rfsr_ray.errors import ConfigError
from rfsr_ray.tune.results import TrialRow, pyplot

DEFAULT_SEEDS = (0, 1, 2)


def default_variants(cfg: RFSRConfig) -> dict[str, dict[str, Any]]:
    """The paper's claims and the reference's shortcut, as overrides of `cfg`. A variant that
    would equal the base (its loss already off, its mode already chosen) is left out."""
    steps = cfg.schedule.num_inference_steps
    windows = cfg.loss_windows()
    losses = cfg.losses
    variants: dict[str, dict[str, Any]] = {"rfsr": {}}
    if {"reward", "gram"} & set(windows):
        everywhere: dict[str, Any] = {"schedule.split": None}
        if "structure" in windows:  # keep its window when the split shorthand set it
            everywhere["losses.structure.window"] = list(windows["structure"])
        for name in ("reward", "gram"):
            if name in windows:
                everywhere[f"losses.{name}.window"] = [0, steps - 1]
        variants["no_split"] = everywhere
    if losses.structure.enabled:
        variants["no_structure"] = {"losses.structure.enabled": False}
    if losses.gram.enabled:
        variants["no_gram"] = {"losses.gram.enabled": False}
        if losses.gram.variant != "kl":
            variants["gram_kl"] = {"losses.gram.variant": "kl"}
    for mode in ("one_step", "trajectory_buffer"):
        if cfg.schedule.mode != mode:
            variants[mode] = {"schedule.mode": mode}
    return variants


def with_default_study(cfg: RFSRConfig) -> RFSRConfig:
    """`cfg` as an ablation study: the default variants unless `tune.variants` names some, the
    seeds 0, 1, 2 unless `tune.space.seed` lists them, no early stopping (every variant is judged
    after the same number of steps), the Gram distance reported by every variant; refuses a
    space that sweeps anything else."""
    tune = cfg.tune
    others = [name for name in tune.space.parameters() if name != "seed"]
    if others:
        raise ConfigError(
            f"an ablation varies only tune.variants and tune.space.seed; tune.space also sets "
            f"{others}: move them into variants (e.g. tune.variants.light_gram="
            "{losses.gram.weight: 1.0}) or run pipelines/tune.py"
        )
    # The schema's default scheduler (ASHA) stands for "not chosen": a resolved config carries
    # every field, so only a scheduler that differs from the default was asked for.
    if tune.scheduler.kind != "none" and tune.scheduler != SchedulerConfig():
        raise ConfigError(
            "an ablation compares trials after the same number of steps: set "
            "tune.scheduler.kind=none (ASHA would stop some variants early)"
        )
    tree = cfg.to_dict()
    if not tune.variants:
        tree["tune"]["variants"] = default_variants(cfg)
    if tune.space.seed is None:
        tree["tune"]["space"]["seed"] = {"grid": list(DEFAULT_SEEDS)}
    tree["tune"]["scheduler"] = {"kind": "none"}
    tree["losses"]["monitor"]["gram_to_base"] = True  # also where a variant turns Gram off
    if tune.search != "grid":
        raise ConfigError("an ablation crosses variants and seeds as a grid: set tune.search=grid")
    study = build_config(tree)
    if study.tune.space.seed.kind != "grid":
        raise ConfigError("tune.space.seed of an ablation lists its seeds: {grid: [0, 1, 2]}")
    return study


# ------------------------------------------------------------------------------------ analysis
@dataclass(frozen=True)
class Metric:
    column: str  # the table's name
    key: str  # the trial report's key
    label: str  # for people: what the number is and which way is better


def study_metrics(cfg: RFSRConfig) -> list[Metric]:
    """What the table reports per variant: the gains over the base model on the held-out set
    (positive is better for each), the Gram distance to the base model and the step time."""
    metrics = [
        Metric("reward_gain", "val_reward_gain", "held-out reward gain over the base ↑"),
        Metric("psnr_gain_db", "val_psnr_gain", "PSNR change (dB) ↑"),
        Metric("ssim_gain", "val_ssim_gain", "SSIM change ↑"),
    ]
    for name in cfg.held_out_metrics():
        if name not in ("psnr", "ssim"):
            metrics.append(Metric(f"{name}_gain", f"val_{name}_gain", f"{name} gain ↑"))
    metrics += [
        Metric("gram_to_base", "val_gram_to_base", "Gram distance to the base ↓"),
        Metric("seconds_per_step", "seconds_per_step", "wall-clock per optimiser step (s)"),
    ]
    return metrics


@dataclass(frozen=True)
class Paired:
    """variant − baseline over the seeds both finished: mean and its t interval."""

    n: int
    mean: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        return self.n >= 2 and (self.low > 0 or self.high < 0)


@dataclass(frozen=True)
class Study:
    variants: list[str]
    baseline: str
    metrics: list[Metric]
    confidence: float
    seeds: dict[str, dict[int, TrialRow]]  # variant → seed → finished trial
    failed: dict[str, list[TrialRow]]  # variant → trials that failed or reported nothing
    paired: dict[str, dict[str, Paired]]  # variant → metric column → paired difference

    def baseline_gains(self) -> dict[str, tuple[Paired, int]]:
        """The baseline's own gains over the base model per gain column, with the number of
        seeds where it is positive. Each seed's gain is already a paired difference (fine-tuned
        − base on the same held-out crops), so its mean and t interval say whether fine-tuning
        moved the metric at all."""
        gains = {}
        for m in self.metrics:
            if m.column.endswith(("_gain", "_gain_db")):
                values = [_value(row, m.key) for row in self.seeds[self.baseline].values()]
                gain = paired_difference(values, self.confidence)
                gains[m.column] = (gain, sum(v > 0 for v in values))
        return gains

    @property
    def comparisons(self) -> int:
        return sum(len(by_metric) for by_metric in self.paired.values())


def _value(row: TrialRow, key: str) -> float:
    return row.final.get(key, math.nan)


def paired_difference(differences: Sequence[float], confidence: float) -> Paired:
    """Mean of per-seed differences with Student's t interval (NaN bounds below 2 pairs)."""
    from scipy import stats

    values = np.asarray([d for d in differences if math.isfinite(d)], dtype=float)
    n = len(values)
    if n == 0:
        return Paired(0, math.nan, math.nan, math.nan)
    mean = float(values.mean())
    if n < 2:
        return Paired(n, mean, math.nan, math.nan)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * values.std(ddof=1) / math.sqrt(n))
    return Paired(n, mean, mean - half, mean + half)


def summarise(cfg: RFSRConfig, rows: Sequence[TrialRow]) -> Study:
    """Group the trials by variant and seed; pair every variant with the baseline by seed."""
    variants = list(cfg.tune.variants)
    baseline = cfg.tune.baseline()
    if baseline is None:
        raise ConfigError("an ablation needs tune.variants")
    seeds: dict[str, dict[int, TrialRow]] = {v: {} for v in variants}
    failed: dict[str, list[TrialRow]] = {v: [] for v in variants}
    for row in rows:
        variant = row.params.get("variant")
        if variant not in seeds:
            continue
        finished = row.error is None and any(k.startswith("val_") for k in row.final)
        if finished:
            seeds[variant][int(row.params.get("seed", 0))] = row
        else:
            failed[variant].append(row)
    metrics = study_metrics(cfg)
    paired: dict[str, dict[str, Paired]] = {}
    for variant in variants:
        if variant == baseline:
            continue
        common = sorted(set(seeds[variant]) & set(seeds[baseline]))
        paired[variant] = {}
        for m in metrics:
            differences = [
                _value(seeds[variant][s], m.key) - _value(seeds[baseline][s], m.key) for s in common
            ]
            paired[variant][m.column] = paired_difference(differences, cfg.tune.confidence)
    return Study(variants, baseline, metrics, cfg.tune.confidence, seeds, failed, paired)


def mean_std(study: Study, variant: str, metric: Metric) -> tuple[float, float, int]:
    values = [_value(row, metric.key) for row in study.seeds[variant].values()]
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return math.nan, math.nan, 0
    std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    return float(np.mean(values)), std, len(values)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _g(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value:.3g}"


def markdown(study: Study) -> str:
    """The two tables (per variant; paired with the baseline) and how to read them."""
    level = f"{100 * study.confidence:g} %"
    head = ["variant", "seeds", "failed"] + [m.column for m in study.metrics]
    lines = [
        "Mean ± std over seeds of each variant's last validation (gains over the base model on "
        "the held-out set: positive is better).",
        "",
        "| " + " | ".join(head) + " |",
        "|---|---:|---:|" + "---:|" * len(study.metrics),
    ]
    for variant in study.variants:
        cells = [variant + (" (baseline)" if variant == study.baseline else "")]
        cells += [str(len(study.seeds[variant])), str(len(study.failed[variant]))]
        for metric in study.metrics:
            mean, std, _ = mean_std(study, variant, metric)
            cells.append(_g(mean) + (f" ± {_g(std)}" if math.isfinite(std) else ""))
        lines.append("| " + " | ".join(cells) + " |")
    gains = [
        f"{column} {_g(p.mean)} [{_g(p.low)}, {_g(p.high)}], > 0 on {positive} of {p.n} seeds"
        + ("; **excludes 0**" if p.significant else "")
        for column, (p, positive) in study.baseline_gains().items()
    ]
    if gains:
        lines += [
            "",
            f"`{study.baseline}`'s own gains over the base model, mean [{level} t interval over "
            "seeds]: " + " · ".join(gains) + ".",
        ]
    lines += [
        "",
        f"Paired differences with `{study.baseline}` (variant − {study.baseline} on the same "
        f"seed): mean [{level} t interval]; **bold** where the interval excludes 0.",
        "",
        "| variant | pairs | " + " | ".join(m.column for m in study.metrics) + " |",
        "|---|---:|" + "---:|" * len(study.metrics),
    ]
    for variant, by_metric in study.paired.items():
        pairs = max((p.n for p in by_metric.values()), default=0)
        cells = [variant, str(pairs)]
        for metric in study.metrics:
            p = by_metric[metric.column]
            text = f"{_g(p.mean)} [{_g(p.low)}, {_g(p.high)}]"
            cells.append(f"**{text}**" if p.significant else text)
        lines.append("| " + " | ".join(cells) + " |")
    marked = sum(p.significant for by in study.paired.values() for p in by.values())
    lines += [
        "",
        f"{study.comparisons} comparisons ({_count(len(study.paired), 'variant')} × "
        f"{_count(len(study.metrics), 'metric')}), each at {level} without a multiplicity "
        f"correction: about {study.comparisons * (1 - study.confidence):.1f} would be marked "
        f"by chance alone if no variant mattered; {marked} are marked.",
    ]
    failures = [row for rows in study.failed.values() for row in rows]
    if failures:
        lines += ["", "Failed trials (not in the means):"]
        for row in failures:
            why = row.error or "reported no validation"
            lines.append(
                f"- {row.params.get('variant')} seed {row.params.get('seed', 0)} "
                f"(trial {row.trial_id}): {why}"
            )
    return "\n".join(lines)


def write_csv(study: Study, path: Path) -> Path:
    """One row per variant: seeds, failures, each metric's mean and std, and each paired
    difference with its interval."""
    header = ["variant", "seeds_ok", "seeds_failed"]
    for m in study.metrics:
        header += [f"{m.column}_mean", f"{m.column}_std"]
    for m in study.metrics:
        header += [f"{m.column}_diff", f"{m.column}_diff_low", f"{m.column}_diff_high"]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for variant in study.variants:
            row: list[Any] = [variant, len(study.seeds[variant]), len(study.failed[variant])]
            for m in study.metrics:
                mean, std, _ = mean_std(study, variant, m)
                row += [mean, std]
            paired = study.paired.get(variant, {})
            for m in study.metrics:
                p = paired.get(m.column)
                row += [p.mean, p.low, p.high] if p else ["", "", ""]
            writer.writerow(row)
    return path


def write_per_seed(study: Study, path: Path) -> Path:
    """Every trial: variant, seed, status and each metric."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["variant", "seed", "trial", "status"] + [m.column for m in study.metrics])
        for variant in study.variants:
            for seed, row in sorted(study.seeds[variant].items()):
                values = [_value(row, m.key) for m in study.metrics]
                writer.writerow([variant, seed, row.trial_id, "ok", *values])
            for row in study.failed[variant]:
                status = "error: " + row.error if row.error else "no validation"
                writer.writerow([variant, row.params.get("seed", 0), row.trial_id, status])
    return path


def plot_reward_vs_psnr(study: Study, path: Path) -> Path | None:
    """Reward gain against PSNR change: one small point per seed, a large marker per variant
    mean. None when no trial finished."""
    if not any(study.seeds.values()):
        return None
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(6.8, 4.8), dpi=100)
    colours = plt.get_cmap("tab10")
    for i, variant in enumerate(study.variants):
        rows = list(study.seeds[variant].values())
        if not rows:
            continue
        x = [_value(r, "val_psnr_gain") for r in rows]
        y = [_value(r, "val_reward_gain") for r in rows]
        colour = colours(i % 10)
        axes.scatter(x, y, color=colour, s=25, alpha=0.6)
        axes.scatter([np.nanmean(x)], [np.nanmean(y)], color=colour, s=160, marker="*",
                     edgecolors="black", label=variant, zorder=3)  # fmt: skip
    axes.axhline(0, color="grey", lw=0.5)
    axes.axvline(0, color="grey", lw=0.5)
    axes.set_xlabel("PSNR change vs base (dB) → higher fidelity")
    axes.set_ylabel("held-out reward gain vs base → better perception")
    axes.set_title("Ablation: one dot per seed, ★ the variant's mean")
    axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_curves(study: Study, path: Path) -> Path | None:
    """Reward gain and PSNR change at each validation, per variant: the mean over seeds with a
    band of ± one standard deviation. None without any validation history."""
    if not any(row.history for rows in study.seeds.values() for row in rows.values()):
        return None
    plt = pyplot()
    figure, panels = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    colours = plt.get_cmap("tab10")
    for i, variant in enumerate(study.variants):
        for axes, key in zip(panels, ("val_reward_gain", "val_psnr_gain"), strict=True):
            by_step: dict[float, list[float]] = {}
            for row in study.seeds[variant].values():
                for report in row.history:
                    if key in report:
                        by_step.setdefault(report["step"], []).append(report[key])
            if not by_step:
                continue
            steps = sorted(by_step)
            mean = np.array([np.mean(by_step[s]) for s in steps])
            std = np.array([np.std(by_step[s]) for s in steps])
            colour = colours(i % 10)
            axes.plot(steps, mean, color=colour, label=variant, marker="o", ms=3)
            axes.fill_between(steps, mean - std, mean + std, color=colour, alpha=0.15)
    panels[0].set_ylabel("held-out reward gain vs base")
    panels[1].set_ylabel("PSNR change vs base (dB)")
    for axes in panels:
        axes.set_xlabel("optimiser step")
        axes.axhline(0, color="grey", lw=0.5)
    panels[0].legend(loc="best", fontsize=8)
    figure.suptitle("Validation during training: mean over seeds, band ± 1 std")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def write_study(cfg: RFSRConfig, rows: Sequence[TrialRow], sweep_dir: Path) -> list[Path]:
    """ablation.md, ablation.csv, per_seed.csv and the plots under the sweep folder."""
    study = summarise(cfg, rows)
    table = sweep_dir / "ablation.md"
    table.write_text(markdown(study) + "\n")
    paths = [table, write_csv(study, sweep_dir / "ablation.csv")]
    paths.append(write_per_seed(study, sweep_dir / "per_seed.csv"))
    for plot in (
        plot_reward_vs_psnr(study, sweep_dir / "reward_vs_psnr.png"),
        plot_curves(study, sweep_dir / "curves.png"),
    ):
        if plot is not None:
            paths.append(plot)
    return paths
