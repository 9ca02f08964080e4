"""Evaluate models (base, fine-tuned exports, checkpoints) on test sets with pyiqa metrics.

python pipelines/evaluate.py --config configs/eval/demo.yaml [key.sub=value ...]
Writes per_image.parquet, aggregate.md/.csv, report.html and comparison.png under
eval.output/eval.name, and records them in an MLflow evaluation run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rfsr_ray.cli import init_ray, run_main
from rfsr_ray.config import RFSRConfig
from rfsr_ray.tracking.mlflow_run import ui_command

if TYPE_CHECKING:
    from rfsr_ray.eval.run import EvalOutcome


def report(outcome: EvalOutcome) -> None:
    print(f"\n{outcome.table}\n")
    for name, why in outcome.skipped_metrics.items():
        print(f"metric {name} skipped: {why}")
    for test_set, counts in outcome.counts.items():
        print(f"{test_set}: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    for item in outcome.bad_images:
        print(f"bad image {item}")
    print(f"\noutputs in {outcome.out_dir}: " + ", ".join(p.name for p in outcome.artifacts))
    if outcome.run is not None:
        print(
            f"MLflow evaluation run {outcome.run.run_id}; open it with:\n  "
            f"{ui_command(outcome.run.tracking_uri)}"
        )


def evaluate(cfg: RFSRConfig) -> int:
    # A local instance needs CPUs beyond the two actor pools (upscaling, scoring) for the tasks
    # that feed them; pools holding every CPU starve those tasks and the run hangs.
    init_ray(max(os.cpu_count() or 1, 2 * cfg.eval.actors_per_model + 2), cfg.model.py_modules)
    # Imported once `run_main` has set up logging: the models' libraries log as they load.
    from rfsr_ray.eval.run import run_evaluation

    report(run_evaluation(cfg))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(evaluate, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
