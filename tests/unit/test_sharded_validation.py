"""Validation sharded across ranks (issue 16 section 5): two gloo ranks each sample their share
of the held-out set and rank 0 gathers and scores it; the metrics and the grid equal one rank's
validation of the same pairs, so the numbers do not depend on the world size."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

from rfsr_ray.losses.rfsr import RFSRLosses
from rfsr_ray.models import build_model
from rfsr_ray.train.context import ValidationSet
from rfsr_ray.train.validate import Validator
from tests.unit.helpers import tiny_config

CPU = torch.device("cpu")
PAIRS = 10  # three batches of 4 (4, 4, 2): rank 0 samples two, rank 1 one


def config():
    return tiny_config(losses={"gram": {"enabled": False}})  # its VGG19 would dominate the time


def validation_set() -> ValidationSet:
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (PAIRS, 32, 32, 3), dtype=np.uint8)
    return ValidationSet(lr=hr[:, ::4, ::4].copy(), hr=hr)


def moved_model(cfg):
    """The same weights in every process: seeded, then moved away from the frozen base."""
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.scale)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def validate(rank: int = 0, world: int = 1):
    torch.set_num_threads(1)  # as in each rank: the same kernels, so the same floating point
    cfg = config()
    validator = Validator(cfg, validation_set(), RFSRLosses(cfg, CPU), CPU, rank, world)
    model = moved_model(cfg)
    base = validator.base(model)
    result = validator.run(model)
    again = validator.run(model)  # a second validation: the base is not sampled again
    return base, result, again


def _rank_main(rank: int, world: int, store: str, out: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world
    )
    try:
        outcome = validate(rank, world)
    finally:
        torch.distributed.destroy_process_group()
    Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(outcome))


def test_two_ranks_give_the_numbers_and_grid_of_one(tmp_path):
    # fork, not spawn: the ranks inherit the imported torch, models and metrics instead of
    # importing them again (~10 s each on 2 cores); they start no threads before gloo does.
    mp.start_processes(
        _rank_main,
        args=(2, str(tmp_path / "store"), str(tmp_path)),
        nprocs=2,
        start_method="fork",
    )
    base, (metrics, grid), (again, _) = pickle.loads((tmp_path / "rank0.pkl").read_bytes())
    assert pickle.loads((tmp_path / "rank1.pkl").read_bytes()) == (None, None, None)

    threads = torch.get_num_threads()
    try:
        one_base, (one_metrics, one_grid), _ = validate()
    finally:
        torch.set_num_threads(threads)
    assert set(metrics) == set(one_metrics) and "reward_gmsd" in metrics
    for name, value in one_metrics.items():
        assert metrics[name] == value, name
    assert base == one_base and again == metrics
    np.testing.assert_array_equal(grid, one_grid)
    assert base != metrics  # the moved weights do change the outputs: the check can fail
