"""An ablation study end to end: 2 variants × 2 seeds through the real pipeline
(`pipelines/ablate.py`: the study config, Tune, the MLflow parent and child runs, the tables and
plots), one trial made to fail. The table's numbers are checked against the trials' own MLflow
runs, and the failed trial is reported, not dropped.

The trials are scripted: each gets its config (the variant applied) and its child run from
`prepare_trial`, as a real trial does, and reports at each validation the numbers a real trial
reports (`val_reward_gain`, `val_*_gain` of the held-out metrics, `val_gram_to_base`,
`val_objective`, `seconds_per_step`), made up from its variant and seed. What is tested here is
the study; the real trial (`run_trial`: a fine-tune reporting to Tune and MLflow) runs in
test_tune.py's two-trial sweep, and validation's Gram distance with the regulariser off in
tests/unit/test_validation_grid.py. Real trials cost ~45 s of CPU each on 2 cores.
"""

from __future__ import annotations

import csv
import functools
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipelines import ablate as ablate_pipeline
from rfsr_ray.tracking import mlflow_run
from rfsr_ray.tune import sweep
from rfsr_ray.tune.sweep import SweepContext, prepare_trial, run_sweep
from tests.integration.conftest import mlflow_client, tiny_args

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
STEPS = 2


def scripted_trial(params: dict[str, Any], context: SweepContext) -> None:
    """Reports made-up validations at every step; no_gram seed 1 fails before its first."""
    from ray import tune

    if (params["variant"], params["seed"]) == ("no_gram", 1):
        raise RuntimeError("deliberate failure of no_gram seed 1")
    trial = prepare_trial(params, context)
    cfg = trial.cfg
    run = mlflow_run.start_run(cfg, cfg.output.run_name, trial.run_id, trial.tags)
    gram = 1.0 if cfg.losses.gram.enabled else 3.0  # off: validation still measures it
    for step in range(1, cfg.train.steps + 1):
        gain = 1e-3 * step * (cfg.train.seed + 1) * (0.5 if cfg.losses.gram.enabled else 1.0)
        report = {
            "val_reward_gain": gain,
            "val_objective": gain,
            "val_gram_to_base": 1e-4 * gram * step,
        }
        # Validation always scores psnr and ssim, and the monitor's held-out metrics.
        held_out = [n for n in cfg.held_out_metrics() if n not in ("psnr", "ssim")]
        for i, name in enumerate(["psnr", "ssim", *held_out]):
            report[f"val_{name}_gain"] = -gain * (i + 1)
        mlflow_run.log_metrics(run, report, step)
        tune.report({"step": step, "seconds_per_step": 0.1 * gram, **report})
    mlflow_run.end_run(run)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_two_variant_two_seed_study_matches_mlflow_and_reports_the_failed_trial(
    ray_cluster, tmp_path, base_model, monkeypatch, capsys
):
    monkeypatch.setattr(sweep, "run_sweep", functools.partial(run_sweep, trial_fn=scripted_trial))
    args = tiny_args(
        tmp_path,
        base_model,
        train__num_workers=1,
        train__steps=STEPS,
        train__checkpoint_every=2,
        train__validate_every=1,
        tracking__experiment="ablation",
        tune__name="study",
        tune__storage_path=str(tmp_path / "ablate"),
        tune__max_concurrent_trials=2,
        tune__space="{seed: {grid: [0, 1]}}",
        tune__variants="{rfsr: {}, no_gram: {losses.gram.enabled: false}}",
    )
    assert ablate_pipeline.main(args) == 1  # a trial failed: the exit status says so
    out = capsys.readouterr()
    assert "ablation study: 2 variants × 2 seeds" in out.out
    assert "1 of 4 trials failed" in out.err
    study = tmp_path / "ablate" / "study"
    table = (study / "ablation.md").read_text()
    assert "no_gram seed 1" in table and "deliberate failure" in table  # reported, not dropped
    assert "comparisons (1 variant ×" in table

    per_seed = read_csv(study / "per_seed.csv")
    statuses = {(r["variant"], r["seed"]): r["status"] for r in per_seed}
    assert statuses[("no_gram", "1")].startswith("error")
    assert [statuses[k] for k in [("rfsr", "0"), ("rfsr", "1"), ("no_gram", "0")]] == ["ok"] * 3

    # Every number of a finished trial is its MLflow run's last value of the same metric.
    client = mlflow_client(tmp_path)
    experiment = client.get_experiment_by_name("ablation")
    children = [
        r
        for r in client.search_runs([experiment.experiment_id])
        if "mlflow.parentRunId" in r.data.tags
    ]
    by_trial = {c.data.tags["rfsr.trial_id"]: c for c in children}
    for row in per_seed:
        if row["status"] != "ok":
            continue
        run = by_trial[row["trial"]]
        for column in ("reward_gain", "psnr_gain_db", "ssim_gain", "gram_to_base"):
            key = "val_" + column.removesuffix("_db")
            history = client.get_metric_history(run.info.run_id, key)
            last = max(history, key=lambda m: m.step).value
            assert float(row[column]) == pytest.approx(last, rel=1e-6, abs=1e-9), column
        assert float(row["seconds_per_step"]) > 0
        assert run.data.params["train.seed"] == row["seed"]

    summary = {r["variant"]: r for r in read_csv(study / "ablation.csv")}
    assert (summary["rfsr"]["seeds_ok"], summary["no_gram"]["seeds_failed"]) == ("2", "1")
    rfsr_gains = [float(r["reward_gain"]) for r in per_seed if r["variant"] == "rfsr"]
    assert float(summary["rfsr"]["reward_gain_mean"]) == pytest.approx(sum(rfsr_gains) / 2)
    seed0 = {r["variant"]: float(r["reward_gain"]) for r in per_seed if r["seed"] == "0"
             and r["status"] == "ok"}  # fmt: skip
    assert float(summary["no_gram"]["reward_gain_diff"]) == pytest.approx(
        seed0["no_gram"] - seed0["rfsr"]
    )  # one pair: the difference, without an interval
    assert summary["no_gram"]["reward_gain_diff_low"] == "nan"
    assert float(summary["no_gram"]["gram_to_base_mean"]) == pytest.approx(3e-4 * STEPS)
    # Each trial trained its variant of the study's config (the child run's params).
    for child in children:
        params = child.data.params
        variant = child.data.tags["rfsr.trial_params"]
        assert params["losses.gram.enabled"] == ("False" if "no_gram" in variant else "True")
        assert params["losses.monitor.gram_to_base"] == "True"  # the study measures it for all

    for plot in ("reward_vs_psnr.png", "curves.png"):
        image = Image.open(study / plot).convert("L")
        assert image.size[0] > 300 and len(image.getcolors()) > 20  # drawn, not blank
    parent = next(
        r
        for r in client.search_runs([experiment.experiment_id])
        if r.data.tags.get("rfsr.kind") == "sweep"
    )
    assert parent.data.metrics["trials_failed"] == 1
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"ablation.md", "ablation.csv", "per_seed.csv", "curves.png"} <= artifacts
