"""Pretrain a diffusion SR model with the standard denoising loss on Ray Train.

python pipelines/pretrain.py --config configs/pretrain_tiny.yaml [--resume] [key.sub=value ...]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from rfsr_ray.cli import init_ray, local_cpus, run_main
from rfsr_ray.config import RFSRConfig
from rfsr_ray.errors import ConfigError


def pretrain(cfg: RFSRConfig) -> int:
    # Imported after run_main has set up logging (see finetune.py).
    from rfsr_ray.tracking.mlflow_run import ui_command
    from rfsr_ray.train.driver import find_resume, run_training

    if cfg.train.loss != "denoise":
        raise ConfigError("pipelines/pretrain.py runs train.loss=denoise; set it in the config")
    find_resume(cfg)  # a rerun with a changed config is refused before Ray starts
    init_ray(local_cpus(cfg), cfg.model.py_modules)
    outcome = run_training(cfg)
    print(f"\nexported model: {outcome.run_dir / 'model'}")
    if outcome.table:
        print(
            "\nheld-out validation (base: the initial model, fine-tuned: the trained EMA):\n"
            + outcome.table
        )
    if outcome.run is not None:
        print(f"MLflow: {ui_command(outcome.run.tracking_uri)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(pretrain, argv, description=__doc__.splitlines()[0], resumable=True)


if __name__ == "__main__":
    sys.exit(main())
