"""RFSR step time of the tiny model: plain single-process loop vs one Ray Train worker.

    .venv/bin/python benchmarks/train_step.py [--steps 60] [--config configs/demo.yaml]

Both runs use the same config, seed and therefore the same sequence of timestep indices; the plain
loop feeds in-memory batches, the Ray run streams from the Ray Data pair pipeline. Targets: Ray
Train adds <= 10% to the compute time of a step; waiting for data is <= 5% of the step time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rfsr_ray.config import load_config, with_absolute_paths
from rfsr_ray.models import build_model
from rfsr_ray.train.step import Batch, build_state, optimizer_step


def plain_loop(cfg, steps: int, warmup: int) -> float:
    """Seconds per optimiser step, single process, one thread (like a 1-CPU Ray worker)."""
    torch.set_num_threads(1)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.data.scale)
    state = build_state(cfg, model, torch.device("cpu"))
    size = cfg.data.patch_size
    hr = torch.rand(cfg.train.batch_size, 3, size, size)
    batch = Batch(torch.nn.functional.interpolate(hr, scale_factor=1 / cfg.data.scale), hr)
    for step in range(steps):
        if step == warmup:
            started = time.perf_counter()
        optimizer_step(state, [batch] * cfg.train.grad_accum, cfg)
    return (time.perf_counter() - started) / (steps - warmup)


def ray_worker(cfg, steps: int, log_every: int) -> tuple[float, float]:
    """(seconds per step, data-wait fraction) of one Ray Train worker, after the first interval."""
    from mlflow.tracking import MlflowClient

    from rfsr_ray.cli import init_ray
    from rfsr_ray.train.driver import run_training

    with tempfile.TemporaryDirectory() as scratch:
        uri = f"sqlite:///{Path(scratch) / 'mlflow.db'}"
        overrides = {
            "train": {
                "num_workers": 1,
                "steps": steps,
                "log_every": log_every,
                "checkpoint_every": steps,
                "validate_every": 10 * steps,
            },
            "data": {"val_source": None},
            "tracking": {"uri": uri},
            "output": {"storage_path": scratch, "run_name": "bench"},
        }
        tree = cfg.to_dict()
        for section, values in overrides.items():
            tree[section].update(values)
        from rfsr_ray.config import build_config

        init_ray(4)
        outcome = run_training(build_config(tree))
        client = MlflowClient(tracking_uri=uri)
        rates = client.get_metric_history(outcome.run.run_id, "samples_per_s")
        waits = client.get_metric_history(outcome.run.run_id, "data_wait_fraction")
    samples = cfg.train.batch_size * cfg.train.grad_accum
    later = [m.value for m in rates if m.step > log_every]
    wait = [m.value for m in waits if m.step > log_every]
    return samples / float(np.mean(later)), float(np.mean(wait))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    cfg = with_absolute_paths(load_config(args.config))
    log_every = max(1, args.steps // 6)
    plain = plain_loop(cfg, args.steps, warmup=log_every)
    print(f"plain loop:        {plain * 1e3:8.1f} ms/step")
    total, wait = ray_worker(cfg, args.steps, log_every)
    compute = total * (1 - wait)
    print(
        f"Ray Train, 1 worker: {total * 1e3:8.1f} ms/step "
        f"({compute * 1e3:.1f} ms computing, data wait {wait:.1%}; target <= 5%)"
    )
    print(
        f"Ray overhead on compute: {compute / plain - 1:+.1%} (target <= +10%); "
        f"on the whole step: {total / plain - 1:+.1%}"
    )


if __name__ == "__main__":
    main()
