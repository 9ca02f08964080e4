"""Ray Tune sweep of RFSR fine-tuning (timestep split, Gram weight, ...), tracked in MLflow.

python pipelines/tune.py --config configs/tune/tiny_split_gram.yaml [key.sub=value ...]
Re-running with the same tune.name resumes the sweep: finished trials are kept.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rfsr_ray.cli import init_ray, local_cpus, run_main
from rfsr_ray.config import RFSRConfig
from rfsr_ray.tune.space import validate_sweep

if TYPE_CHECKING:
    from rfsr_ray.tune.sweep import SweepOutcome


def report(outcome: SweepOutcome) -> None:
    from rfsr_ray.tracking.mlflow_run import ui_command

    resumed = " (resumed)" if outcome.resumed else ""
    print(f"\nsweep folder{resumed}: {outcome.sweep_dir}\n\n{outcome.table}\n")
    for path in outcome.artifacts:
        print(f"  {path}")
    if outcome.best is not None:
        print(f"\nbest trial {outcome.best.trial_id}; fine-tune it with:")
        print(f"  python pipelines/finetune.py --config {outcome.best_config}")
    if outcome.parent is not None:
        print(
            f"\nMLflow parent run {outcome.parent.run_id}; open it with:\n  "
            f"{ui_command(outcome.parent.tracking_uri)}"
        )


def tune(cfg: RFSRConfig) -> int:
    # Imported after run_main has set up logging (see finetune.py).
    from rfsr_ray.train.driver import check_base_model, ensure_base_model
    from rfsr_ray.tune.sweep import run_sweep

    validate_sweep(cfg)  # before Ray starts: a bad space costs no cluster time
    init_ray(local_cpus(cfg, cfg.tune.max_concurrent_trials), cfg.model.py_modules)
    ensure_base_model(cfg)
    check_base_model(cfg)
    outcome = run_sweep(cfg)
    report(outcome)
    if outcome.best is None:
        print("error: no trial reported a finite objective; see the status column", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(tune, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
