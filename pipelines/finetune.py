"""RFSR fine-tuning of a diffusion SR model on Ray Train, tracked in MLflow.

python pipelines/finetune.py --config configs/demo.yaml [--resume] [key.sub=value ...]
ray job submit --working-dir . -- python pipelines/finetune.py --config configs/finetune/…
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rfsr_ray.cli import init_ray, local_cpus, run_main
from rfsr_ray.config import RFSRConfig
from rfsr_ray.errors import ConfigError

if TYPE_CHECKING:
    from rfsr_ray.train.driver import TrainingOutcome


def report(outcome: TrainingOutcome) -> None:
    from rfsr_ray.tracking.mlflow_run import run_page_url, ui_command

    print(f"\nrun folder: {outcome.run_dir} (exported model: {outcome.run_dir / 'model'})")
    if outcome.table:
        print("\nheld-out validation, bicubic vs base vs fine-tuned (EMA):\n" + outcome.table)
    if outcome.run is not None:
        page = run_page_url("http://127.0.0.1:5000", outcome.run.experiment_id, outcome.run.run_id)
        print(
            f"\nMLflow run {outcome.run.run_id}; open it with:\n  "
            f"{ui_command(outcome.run.tracking_uri)}\nthen {page}"
        )


def finetune(cfg: RFSRConfig) -> int:
    # Imported here, after run_main has set up logging (torch, diffusers and Ray load with it),
    # so --help and config errors answer at once.
    from rfsr_ray.train.driver import check_base_model, ensure_base_model, find_resume, run_training

    if cfg.train.loss != "rfsr":
        raise ConfigError(
            "pipelines/finetune.py runs train.loss=rfsr; use "
            "pipelines/pretrain.py for the denoise loss"
        )
    if cfg.model.family == "tiny" and cfg.model.pretrained is None:
        raise ConfigError(
            "model.pretrained is not set: RFSR fine-tunes an existing model; give "
            "its folder, or set model.pretrain_config to create one first"
        )
    find_resume(cfg)  # a rerun with a changed config is refused before Ray or a pretrain starts
    init_ray(local_cpus(cfg), cfg.model.py_modules)
    ensure_base_model(cfg)
    check_base_model(cfg)
    report(run_training(cfg))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(finetune, argv, description=__doc__.splitlines()[0], resumable=True)


if __name__ == "__main__":
    sys.exit(main())
