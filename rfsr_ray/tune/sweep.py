"""The Tune driver: each trial is a function that builds and fits a TorchTrainer (the Ray 2.60
pattern), reporting every validation to Tune through `TuneReportCallback`. The sweep is an MLflow
parent run with one nested child run per trial; re-running a sweep with the same name resumes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rfsr_ray.config import RFSRConfig, build_config
from rfsr_ray.errors import ConfigError, TrainingError
from rfsr_ray.tracking import mlflow_run
from rfsr_ray.tune import results
from rfsr_ray.tune.space import (
    describe,
    param_space,
    parameter_names,
    trial_config,
    validate_sweep,
)

log = logging.getLogger("rfsr_ray.tune")
METRIC = "val_objective"
TRIAL_TAG = "rfsr.trial_id"


@dataclass(frozen=True)
class SweepContext:
    """What every trial receives besides its parameters (picklable; no driver globals)."""

    cfg: RFSRConfig  # the base config, absolute paths and tracking URI
    parent: mlflow_run.RunHandle | None
    train_storage: str  # each trial's TorchTrainer run lives in train_storage/trial_<id>


@dataclass(frozen=True)
class SweepOutcome:
    sweep_dir: Path
    rows: list[results.TrialRow]
    table: str
    best: results.TrialRow | None
    best_config: Path | None
    artifacts: list[Path]
    parent: mlflow_run.RunHandle | None
    resumed: bool
    study: str | None = None  # an ablation's ablation.md (tune.variants), else None


@dataclass(frozen=True)
class TrialSetup:
    """What a trial trains and where it logs."""

    cfg: RFSRConfig  # the base config with the trial's parameters; its run is trial_<id>
    tags: dict[str, str]  # MLflow tags nesting the trial's run under the sweep ({}: no tracking)
    run_id: str | None  # the child run a trial restarted by a resumed sweep continues


def prepare_trial(params: dict[str, Any], context: SweepContext) -> TrialSetup:
    """The config, MLflow tags and child run of the current Tune trial (call it inside a trial).

    Scripted trial functions in the tests share it with `run_trial`."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    tree = trial_config(context.cfg, params).to_dict()
    tree["output"].update(storage_path=context.train_storage, run_name=f"trial_{trial_id}")
    tags: dict[str, str] = {}
    run_id = None
    if context.parent is not None:
        tags = {
            "mlflow.parentRunId": context.parent.run_id,
            "rfsr.sweep": context.cfg.tune.name,
            TRIAL_TAG: trial_id,
            "rfsr.trial_params": json.dumps(params, sort_keys=True),
        }
        # A trial restarted by a resumed sweep continues its own child run.
        run_id = mlflow_run.find_child_run(context.parent, TRIAL_TAG, trial_id)
    log.info("trial %s: %s", trial_id, describe(params))
    return TrialSetup(build_config(tree), tags, run_id)


def run_trial(params: dict[str, Any], context: SweepContext) -> None:
    """One trial: the fine-tune with `params` applied, in its own TorchTrainer."""
    from ray.tune.integration.ray_train import TuneReportCallback

    # Imported here, not at the top: torch and the model families cost a trial actor ~10 s of
    # CPU, which a scripted trial function (`run_sweep(trial_fn=...)`) does not need.
    from rfsr_ray.train.driver import run_training

    trial = prepare_trial(params, context)
    run_training(
        trial.cfg,
        callbacks=[TuneReportCallback()],
        tags=trial.tags,
        run_id=trial.run_id,
        console=False,
    )


TrialFunction = Callable[[dict[str, Any], SweepContext], None]


def run_sweep(cfg: RFSRConfig, trial_fn: TrialFunction = run_trial) -> SweepOutcome:
    """Run (or resume) the sweep `tune.name` under `tune.storage_path`."""
    validate_sweep(cfg)
    tree = cfg.to_dict()
    # Trials run in other working directories: pin the tracking store to an absolute URI.
    tree["tracking"]["uri"] = mlflow_run.resolve_tracking_uri(cfg)
    cfg = build_config(tree)
    sweep_dir = Path(cfg.tune.storage_path) / cfg.tune.name
    parent = _parent_run(cfg, sweep_dir)
    cfg.save(sweep_dir / "config.yaml")
    context = SweepContext(cfg, parent, str(sweep_dir / "train"))
    tuner, resumed = _tuner(cfg, sweep_dir, trial_fn, context)
    try:
        grid = tuner.fit()
    except Exception as error:  # Tune's own failures (trial errors land in the result grid)
        if parent is not None:
            mlflow_run.end_run(parent, "FAILED")
        raise TrainingError(f"sweep {cfg.tune.name!r} failed: {error}") from error
    rows = [_row(cfg, result) for result in grid]
    outcome = _write_outputs(cfg, sweep_dir, rows, parent, resumed)
    if parent is not None:
        _close_child_runs(cfg, parent, rows)
        _log_parent(parent, outcome)
    return outcome


def _fingerprint(cfg: RFSRConfig) -> str:
    """Everything that defines the sweep's trials (not how many run at once)."""
    tree = cfg.to_dict()
    for key in ("max_concurrent_trials", "trial_cpus"):
        tree["tune"].pop(key)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def _parent_run(cfg: RFSRConfig, sweep_dir: Path) -> mlflow_run.RunHandle | None:
    """Create the sweep's parent run, or reopen it when the sweep resumes; refuse to resume a
    sweep whose config changed."""
    state_file = sweep_dir / "sweep.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if state and state["fingerprint"] != _fingerprint(cfg):
        raise ConfigError(
            f"tune.name={cfg.tune.name!r} in {cfg.tune.storage_path} already holds a sweep with "
            "another config (space, base config or search); re-run it unchanged to resume, or "
            "choose a new tune.name"
        )
    parent = None
    if cfg.tracking.enabled:
        parent = mlflow_run.start_run(
            cfg, cfg.tune.name, state.get("parent_run_id"), tags={"rfsr.kind": "sweep"}
        )
    sweep_dir.mkdir(parents=True, exist_ok=True)
    state = {"fingerprint": _fingerprint(cfg), "parent_run_id": parent.run_id if parent else None}
    state_file.write_text(json.dumps(state, indent=2))
    return parent


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _tuner(
    cfg: RFSRConfig, sweep_dir: Path, trial_fn: TrialFunction, context: SweepContext
) -> tuple[Any, bool]:
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(trial_fn, context=context), {"CPU": cfg.tune.trial_cpus}
    )
    experiment = sweep_dir / "tune"
    if tune.Tuner.can_restore(str(experiment)):
        log.info(
            "resuming sweep %s: finished trials are kept, unfinished ones continue", experiment
        )
        return tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True), True
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            search_alg=_search_alg(cfg),
            scheduler=_scheduler(cfg),
            num_samples=cfg.tune.num_samples,
            max_concurrent_trials=cfg.tune.max_concurrent_trials,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir)),
    )
    return tuner, False


def _search_alg(cfg: RFSRConfig) -> Any:
    if cfg.tune.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=cfg.tune.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Tune ignores TuneConfig.max_concurrent_trials for a BasicVariantGenerator: limit it here.
    return BasicVariantGenerator(
        max_concurrent=cfg.tune.max_concurrent_trials, random_state=cfg.tune.seed
    )


def _scheduler(cfg: RFSRConfig) -> Any:
    settings = cfg.tune.scheduler
    if settings.kind == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # Trials report at validations; `step` (optimiser steps) is the time axis.
    return ASHAScheduler(
        time_attr="step",
        max_t=cfg.train.steps,
        grace_period=settings.grace_period,
        reduction_factor=settings.reduction_factor,
        brackets=settings.brackets,
    )


def _row(cfg: RFSRConfig, result: Any) -> results.TrialRow:
    names = parameter_names(cfg)
    params = {name: result.config[name] for name in names if name in result.config}
    error = None
    if result.error is not None:
        text = str(result.error).strip().splitlines()
        error = text[-1] if text else type(result.error).__name__
    trial_id = Path(result.path).name.removeprefix("trial_")
    frame = result.metrics_dataframe  # every report of the trial; None if it made none
    history = frame.to_dict("records") if frame is not None else []
    return results.trial_row(cfg, trial_id, params, result.metrics or {}, error, history)


def _write_outputs(
    cfg: RFSRConfig,
    sweep_dir: Path,
    rows: list[results.TrialRow],
    parent: mlflow_run.RunHandle | None,
    resumed: bool,
) -> SweepOutcome:
    rows = sorted(rows, key=lambda r: r.trial_id)
    best = results.best_row(rows)
    table = results.markdown_table(rows, best)
    (sweep_dir / "results.md").write_text(table + "\n")
    artifacts = [sweep_dir / "results.md", results.write_csv(rows, sweep_dir / "results.csv")]
    plot = results.plot_fidelity_perception(rows, sweep_dir / "fidelity_perception.png")
    heatmap = None
    if cfg.tune.search == "grid" and not cfg.tune.variants:
        heatmap = results.plot_objective_heatmap(rows, sweep_dir / "objective_heatmap.png")
    artifacts += [path for path in (plot, heatmap) if path is not None]
    if cfg.tune.variants:  # an ablation: the study's tables and plots, no "best" config
        from rfsr_ray.tune.ablation import write_study

        artifacts += write_study(cfg, rows, sweep_dir)
        study = (sweep_dir / "ablation.md").read_text()
        return SweepOutcome(sweep_dir, rows, table, best, None, artifacts, parent, resumed, study)
    best_config = None
    if best is not None:
        best_config = results.write_best_config(cfg, best, sweep_dir / "best_config.yaml")
        artifacts.append(best_config)
    return SweepOutcome(sweep_dir, rows, table, best, best_config, artifacts, parent, resumed)


def _close_child_runs(
    cfg: RFSRConfig, parent: mlflow_run.RunHandle, rows: list[results.TrialRow]
) -> None:
    """Tune ends a trial by killing its actor once the scheduler decides (at max_t, or early
    for ASHA), which leaves the child run RUNNING: close it FINISHED when the trial ran every
    step, KILLED when it was stopped early, and tag which."""
    by_id = {row.trial_id: row for row in rows}
    for run in mlflow_run.child_runs(parent):
        row = by_id.get(run.data.tags.get(TRIAL_TAG, ""))
        if row is None:
            continue
        handle = mlflow_run.RunHandle(parent.tracking_uri, run.info.run_id, parent.experiment_id)
        mlflow_run.set_tags(handle, {"rfsr.asha_stopped": str(row.asha_stopped).lower()})
        if run.info.status == "RUNNING":
            complete = row.error is None and row.steps >= cfg.train.steps
            mlflow_run.end_run(handle, "FINISHED" if complete else "KILLED")


def _log_parent(parent: mlflow_run.RunHandle, outcome: SweepOutcome) -> None:
    rows = outcome.rows
    metrics = {
        "trials": len(rows),
        "trials_asha_stopped": sum(r.asha_stopped for r in rows),
        "trials_failed": sum(r.error is not None for r in rows),
    }
    if outcome.best is not None:
        metrics["best_objective"] = outcome.best.objective
        metrics["best_reward_gain"] = outcome.best.reward_gain
        metrics["best_psnr_change"] = outcome.best.psnr_change
        mlflow_run.set_tags(parent, {"rfsr.best_trial": outcome.best.trial_id})
    mlflow_run.log_metrics(parent, metrics, step=0)
    for path in outcome.artifacts:
        mlflow_run.log_artifact(parent, path)
    mlflow_run.end_run(parent)
