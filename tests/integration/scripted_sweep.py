"""`pipelines/tune.py` with scripted trials, run as a subprocess by test_tune.py's
kill-and-resume test (the driver it kills; its re-run uses `scripted_trial` in the test's process):

    python -m tests.integration.scripted_sweep key.sub=value ...

Each trial reports `val_objective = -gram_weight` at every step of `train.steps`, one step per
`STEP_SECONDS`, and keeps its progress in its run folder, where a real trial keeps its Ray Train
checkpoints: a trial restarted by a resumed sweep continues after its last finished step. Like a
real trial, it gets its config, tags and child run from `prepare_trial` and logs to that run. For
the test it appends the step it starts after to `starts.txt`, and writes `done` before its last
report, where a real trial exports its model.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Any

from pipelines import tune as tune_pipeline
from rfsr_ray.tracking import mlflow_run
from rfsr_ray.tune import sweep
from rfsr_ray.tune.sweep import SweepContext, prepare_trial, run_sweep

STEP_SECONDS = 0.5


def scripted_trial(params: dict[str, Any], context: SweepContext) -> None:
    from ray import tune

    trial = prepare_trial(params, context)
    folder = Path(trial.cfg.output.storage_path) / trial.cfg.output.run_name
    folder.mkdir(parents=True, exist_ok=True)
    progress = folder / "step"
    finished = int(progress.read_text()) if progress.is_file() else 0
    with (folder / "starts.txt").open("a") as handle:
        handle.write(f"{finished}\n")
    run = None
    if trial.tags:
        run = mlflow_run.start_run(trial.cfg, trial.cfg.output.run_name, trial.run_id, trial.tags)
    objective = -params["gram_weight"]
    for step in range(finished + 1, trial.cfg.train.steps + 1):
        time.sleep(STEP_SECONDS)
        if run is not None:
            mlflow_run.log_metrics(run, {"val_objective": objective}, step)
        progress.write_text(str(step))
        if step == trial.cfg.train.steps:
            (folder / "done").touch()
        tune.report({"step": step, "val_objective": objective})


if __name__ == "__main__":
    # Everything else is the real pipeline: validation, Ray, the base-model check, the report.
    # pipelines/tune.py imports run_sweep when it runs: replace it where it is imported from.
    sweep.run_sweep = functools.partial(run_sweep, trial_fn=scripted_trial)
    sys.exit(tune_pipeline.main())
