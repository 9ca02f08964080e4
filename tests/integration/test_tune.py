"""Ray Tune sweeps: a real 2-trial sweep of the tiny model end to end; ASHA, sampled searches and
resume after a kill with scripted trials; spaces rejected before any trial starts."""

from __future__ import annotations

import csv
import functools
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from pipelines import tune as tune_pipeline
from rfsr_ray.config import load_config
from rfsr_ray.tune import sweep
from rfsr_ray.tune.sweep import run_sweep
from tests.integration.conftest import ROOT, mlflow_client, tiny_args

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def sweep_args(tmp_path: Path, base: Path, name: str = "sweep", **extra: object) -> list[str]:
    """A sweep of the tiny model: 1 worker per trial, 4 steps, validation every 2."""
    args = {
        "train.num_workers": 1,
        "train.steps": 4,
        "train.checkpoint_every": 2,
        "train.validate_every": 2,
        "tracking.experiment": "sweeps",
        "tune.name": name,
        "tune.storage_path": str(tmp_path / "tune"),
        "tune.search": "grid",
        "tune.max_concurrent_trials": 2,
        "tune.space": "{split_index: {grid: [2]}, gram_weight: {grid: [0.5, 50.0]}}",
        "tune.scheduler.kind": "none",
    }
    args.update({key.replace("__", "."): value for key, value in extra.items()})
    return tiny_args(tmp_path, base, "unused") + [f"{k}={v}" for k, v in args.items()]


def sweep_runs(tmp_path: Path):
    client = mlflow_client(tmp_path)
    experiment = client.get_experiment_by_name("sweeps")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("rfsr.kind") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_two_trial_sweep_writes_table_plots_child_runs_and_best_config(
    ray_cluster, tmp_path, base_model, capsys
):
    # Two steps: validation at steps 0 and 2, a checkpoint at 2.
    assert tune_pipeline.main(sweep_args(tmp_path, base_model, train__steps=2)) == 0
    out = capsys.readouterr().out
    sweep_dir = tmp_path / "tune" / "sweep"
    assert "| trial |" in out and "pipelines/finetune.py --config" in out
    rows = read_rows(sweep_dir / "results.csv")
    assert sorted(float(r["gram_weight"]) for r in rows) == [0.5, 50.0]
    for row in rows:
        assert (row["structure_end"], row["reward_start"], row["steps"]) == ("1", "2", "2")
        assert row["asha_stopped"] == "False" and row["status"] == "ok"
        for key in ("reward_gain", "psnr_change_db", "gram_distance", "objective"):
            assert math.isfinite(float(row[key])), key
    for plot in ("fidelity_perception.png", "objective_heatmap.png"):
        image = Image.open(sweep_dir / plot).convert("L")
        assert image.size[0] > 300 and len(image.getcolors()) > 20  # drawn, not blank
    best = load_config(sweep_dir / "best_config.yaml")
    assert best.schedule.split.reward_start == 2 and best.losses.gram.weight in (0.5, 50.0)
    assert best.output.run_name == "sweep_best" and not best.tune.space.parameters()

    parents, children = sweep_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials"] == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(float(c.data.params["losses.gram.weight"]) for c in children) == [0.5, 50.0]
    assert {c.data.params["schedule.split.reward_start"] for c in children} == {"2"}
    assert {c.info.status for c in children} == {"FINISHED"}
    client = mlflow_client(tmp_path)
    by_trial = {row["trial"]: row for row in rows}
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val_objective")
        assert sorted(m.step for m in history) == [0, 2]
        # What the trial's fine-tune reported to Tune is what it logged: each number of the
        # table is the child run's value at the last step (test_ablation.py's study relies on it).
        row = by_trial[child.data.tags["rfsr.trial_id"]]
        for column, key in (
            ("objective", "val_objective"),
            ("reward_gain", "val_reward_gain"),
            ("psnr_change_db", "val_psnr_gain"),
            ("gram_distance", "val_gram_to_base"),
        ):
            last = max(client.get_metric_history(child.info.run_id, key), key=lambda m: m.step)
            assert last.step == 2
            assert float(row[column]) == pytest.approx(last.value, rel=1e-6, abs=1e-9), column
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "results.md", "fidelity_perception.png", "best_config.yaml"} <= artifacts


def test_asha_stops_a_clearly_worse_trial_early(ray_cluster, tmp_path, base_model):
    """Scripted trials: the objective is −gram_weight, reported at every step. With one trial at
    a time, the good one (gram 1) runs first, so the bad one (gram 100) meets a full rung."""

    def scripted_trial(params, context):
        from ray import tune

        for step in range(1, context.cfg.train.steps + 1):
            tune.report(
                {
                    "step": step,
                    "val_objective": -params["gram_weight"],
                    "val_reward_gain": -params["gram_weight"],
                    "val_psnr_gain": 0.0,
                }
            )

    args = sweep_args(
        tmp_path,
        base_model,
        "asha",
        train__steps=8,
        train__validate_every=1,
        train__checkpoint_every=1,
        tune__max_concurrent_trials=1,
        tune__space="{gram_weight: {grid: [1.0, 100.0]}}",
        tune__scheduler="{kind: asha, grace_period: 1, reduction_factor: 2}",
    )
    cfg = load_config(None, args)
    outcome = run_sweep(cfg, trial_fn=scripted_trial)
    rows = {row.params["gram_weight"]: row for row in outcome.rows}
    assert rows[1.0].steps == 8 and not rows[1.0].asha_stopped
    assert rows[100.0].steps < 8 and rows[100.0].asha_stopped
    assert outcome.best.params == {"gram_weight": 1.0}
    _, children = sweep_runs(tmp_path)
    assert children == []  # scripted trials log nothing; the parent alone exists


def test_rejected_spaces_name_the_parameter_before_any_trial(tmp_path, base_model, capsys):
    cases = {
        "{split_index: {grid: [2, 4]}}": "tune.space.split_index=4",  # no reward window left
        "{gram_weight: {grid: [-1.0, 1.0]}}": "tune.space.gram_weight=-1",
        "{gram_weight: {loguniform: [0, 1]}}": "tune.space.gram_weight",
        "{structure_end: {grid: [1, 2]}, reward_start: {grid: [2]}}": "structure_end=2",
        "{reward_weights: {fsim: {grid: [1.0]}}}": "no reward term named 'fsim'",
    }
    for space, message in cases.items():
        args = sweep_args(tmp_path, base_model, tune__space=space)
        assert tune_pipeline.main(args) == 2, space
        err = capsys.readouterr().err
        assert "ConfigError" in err and message in err, (space, err)
    assert not (tmp_path / "tune").exists()  # nothing started


def test_killed_sweep_resumes_instead_of_starting_over(
    ray_cluster, tmp_path, base_model, monkeypatch, capsys, caplog
):
    """Kill the sweep's driver while the second of two trials runs; the re-run keeps the finished
    trial and continues the other after its last step, in the same MLflow runs. The trials are
    scripted (tests/integration/scripted_sweep.py): what is tested is the sweep's resume, not the
    fine-tune's (test_training.py resumes that)."""
    args = sweep_args(
        tmp_path,
        base_model,
        "resume",
        tune__max_concurrent_trials=1,
        tune__space="{gram_weight: {grid: [0.5, 50.0]}}",
    )
    command = [sys.executable, "-m", "tests.integration.scripted_sweep", *args]
    # The driver joins this session's cluster; Tune snapshots the experiment at every step (by
    # default every 10 s), so the kill below always finds the second trial in the snapshot.
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
        "TUNE_GLOBAL_CHECKPOINT_S": "0",
    }
    train_dir = tmp_path / "tune" / "resume" / "train"
    log = (tmp_path / "first.log").open("w")
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            trials = list(train_dir.glob("trial_*"))
            done = [t for t in trials if (t / "done").is_file()]
            running = [t for t in trials if t not in done and (t / "step").is_file()]
            if done and running:
                break
            time.sleep(0.2)
        else:
            log_text = (tmp_path / "first.log").read_text()
            pytest.fail(f"no state with one trial done and one part-way:\n{log_text}")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    (first,), (second,) = done, running
    assert len(list(train_dir.glob("trial_*"))) == 2  # one trial at a time

    # Imported here, not at the top: the trial actors of this file's other tests import it.
    from tests.integration.scripted_sweep import scripted_trial

    # The re-run is this process (the same pipeline; a second driver process would cost ~15 s
    # of CPU to start): pipelines/tune.py with the scripted trials, as scripted_sweep.py runs it.
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "0")
    monkeypatch.setattr(sweep, "run_sweep", functools.partial(run_sweep, trial_fn=scripted_trial))
    caplog.clear()
    capsys.readouterr()
    assert tune_pipeline.main(args) == 0
    assert "sweep folder (resumed)" in capsys.readouterr().out
    assert "resuming sweep" in caplog.text  # Tune restored the experiment
    # The finished trial did not run again; the other restarted after its last finished step.
    assert (first / "starts.txt").read_text().split() == ["0"]
    restarts = [int(step) for step in (second / "starts.txt").read_text().split()]
    assert len(restarts) == 2 and restarts[0] == 0 and 1 <= restarts[1] < 4
    assert (second / "done").is_file()
    rows = read_rows(tmp_path / "tune" / "resume" / "results.csv")
    assert len(rows) == 2 and {r["steps"] for r in rows} == {"4"}
    parents, children = sweep_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 2  # same parent, one child per trial
    assert {c.info.status for c in children} == {"FINISHED"}
    client = mlflow_client(tmp_path)
    for child in children:  # the restarted trial continued its child run
        history = client.get_metric_history(child.info.run_id, "val_objective")
        assert {m.step for m in history} == {1, 2, 3, 4}


@pytest.mark.parametrize("search", ["random", "optuna"])
def test_sampled_searches_draw_inside_the_declared_ranges(ray_cluster, tmp_path, search):
    """Random and Optuna search over a log-uniform weight and an integer split, with scripted
    trials (the objective prefers a small Gram weight)."""

    def scripted_trial(params, context):
        from ray import tune

        tune.report({"step": context.cfg.train.steps, "val_objective": -params["gram_weight"]})

    args = sweep_args(
        tmp_path,
        Path("unused"),
        search,
        tracking__enabled="false",
        tune__search=search,
        tune__num_samples=4,
        tune__space="{split_index: {randint: [1, 3]}, gram_weight: {loguniform: [1.0e-3, 1.0]}}",
    )
    outcome = run_sweep(load_config(None, args), trial_fn=scripted_trial)
    assert len(outcome.rows) == 4
    for row in outcome.rows:
        assert 1 <= row.params["split_index"] <= 3
        assert 1e-3 <= row.params["gram_weight"] <= 1.0
        assert row.reward_start == row.params["split_index"]
    assert len({row.params["gram_weight"] for row in outcome.rows}) == 4
    assert outcome.best.gram_weight == min(row.gram_weight for row in outcome.rows)
    assert outcome.best_config is not None and outcome.best_config.is_file()
