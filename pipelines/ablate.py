"""Ablation study of RFSR's parts: named variants of one fine-tune config, compared over seeds.

Each variant trains once per seed as a Ray Tune trial under one MLflow parent run; each is compared
with the baseline by per-seed paired differences.

python pipelines/ablate.py --config configs/ablate/tiny.yaml [key.sub=value ...]
Without tune.variants the default variants run (rfsr, no_split, no_structure, no_gram, gram_kl,
one_step, trajectory_buffer, less any that equal the base), with seeds 0, 1, 2 unless
tune.space.seed lists others. Writes ablation.md/.csv, per_seed.csv, reward_vs_psnr.png and
curves.png under tune.storage_path/tune.name; re-running resumes the study.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rfsr_ray.cli import init_ray, local_cpus, run_main
from rfsr_ray.config import RFSRConfig
from rfsr_ray.tune.ablation import with_default_study
from rfsr_ray.tune.space import validate_sweep

if TYPE_CHECKING:
    from rfsr_ray.tune.sweep import SweepOutcome


def report(outcome: SweepOutcome) -> None:
    from rfsr_ray.tracking.mlflow_run import ui_command

    resumed = " (resumed)" if outcome.resumed else ""
    print(f"\nablation folder{resumed}: {outcome.sweep_dir}\n\n{outcome.study}\n")
    for path in outcome.artifacts:
        print(f"  {path}")
    if outcome.parent is not None:
        print(
            f"\nMLflow parent run {outcome.parent.run_id}; open it with:\n  "
            f"{ui_command(outcome.parent.tracking_uri)}"
        )


def ablate(cfg: RFSRConfig) -> int:
    # Imported after run_main has set up logging (see finetune.py).
    from rfsr_ray.train.driver import check_base_model, ensure_base_model
    from rfsr_ray.tune.sweep import run_sweep

    cfg = with_default_study(cfg)
    validate_sweep(cfg)  # before Ray starts: a variant that cannot run costs no cluster time
    variants, seeds = list(cfg.tune.variants), list(cfg.tune.space.seed.values)
    print(f"ablation {cfg.tune.name}: {len(variants)} variants × {len(seeds)} seeds: {variants}")
    init_ray(local_cpus(cfg, cfg.tune.max_concurrent_trials), cfg.model.py_modules)
    ensure_base_model(cfg)
    check_base_model(cfg)
    outcome = run_sweep(cfg)
    report(outcome)
    failed = sum(r.error is not None for r in outcome.rows)
    if failed:
        total = len(outcome.rows)
        print(f"error: {failed} of {total} trials failed (listed above)", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(ablate, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
