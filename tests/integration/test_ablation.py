"""An ablation study end to end: 2 variants × 2 seeds of the tiny model through the real
pipeline (`pipelines/ablate.py`), one trial made to fail. The table's numbers are checked against
the trials' own MLflow runs, and the failed trial is reported, not dropped."""

from __future__ import annotations

import csv
import functools
import math
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipelines import ablate as ablate_pipeline
from rfsr_ray.tune import sweep
from rfsr_ray.tune.sweep import SweepContext, run_sweep, run_trial
from tests.integration.conftest import mlflow_client, tiny_args

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def failing_for_no_gram_seed_1(params: dict[str, Any], context: SweepContext) -> None:
    if (params["variant"], params["seed"]) == ("no_gram", 1):
        raise RuntimeError("deliberate failure of no_gram seed 1")
    run_trial(params, context)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_two_variant_two_seed_study_matches_mlflow_and_reports_the_failed_trial(
    ray_cluster, tmp_path, base_model, monkeypatch, capsys
):
    monkeypatch.setattr(
        sweep, "run_sweep", functools.partial(run_sweep, trial_fn=failing_for_no_gram_seed_1)
    )
    args = tiny_args(
        tmp_path,
        base_model,
        train__num_workers=1,
        train__steps=2,
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
    # Gram off: nothing pulls towards the base's Gram matrices, and the Gram loss is not run.
    assert math.isfinite(float(summary["no_gram"]["gram_to_base_mean"]))

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
