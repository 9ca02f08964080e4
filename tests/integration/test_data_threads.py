"""The loop returns only after the threads of its Ray Data iterator have stopped, and Ray Data
still names them as the loop expects (`RAY_DATA_ITERATOR_THREAD`; the unit test of the wait,
test_ingest_order.py, takes the name on trust).

Closing Ray Data's iterator only asks its threads to stop; one fetching the next block finishes
the fetch first. In Train's local mode the loop runs in the driver, which shuts Ray down as soon
as training returns: a thread still fetching then called into the shut-down core worker, and
Ray ended the process with exit code 1 ("The core worker has already been shutdown") after a
run that had succeeded. This ended the test session (the killed-worker test's local-mode re-run
runs last) with exit code 1 and no summary after every test had passed (2 of 2 runs of that
test before the fix, 0 of 2 after)."""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def slow_pairs(batch: dict) -> dict:
    """Pairs that take a while to make, so that a fetch is under way when training stops."""
    time.sleep(0.3)
    size = len(batch["id"])
    hr = np.zeros((size, 32, 32, 3), np.uint8)
    return {"lr": hr[:, ::4, ::4].copy(), "hr": hr, "epoch": np.zeros(size, np.int64)}


def iterator_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    from rfsr_ray.train.loop import RAY_DATA_ITERATOR_THREAD

    return [
        thread
        for thread in threading.enumerate()
        if thread.name == RAY_DATA_ITERATOR_THREAD and thread not in before
    ]


def test_the_loop_returns_after_its_ray_data_threads_stop(ray_cluster, tmp_path, monkeypatch):
    import ray.data
    import ray.train

    from rfsr_ray.models import build_model
    from rfsr_ray.train import loop
    from rfsr_ray.train.checkpoint import Progress
    from rfsr_ray.train.context import LoopContext
    from rfsr_ray.train.step import build_state
    from tests.unit.helpers import tiny_config

    cfg = tiny_config(
        losses={"gram": {"enabled": False}},
        train={"steps": 2, "batch_size": 2, "num_workers": 0, "validate_every": 100},
    )
    dataset = ray.data.range(200, override_num_blocks=100).map_batches(slow_pairs, batch_size=2)
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: dataset.iterator())
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kwargs: None)
    before = set(threading.enumerate())
    during: list[int] = []
    step = loop.optimizer_step

    def counting_step(*args, **kwargs):  # the iterator's threads run while the loop trains
        during.append(len(iterator_threads(before)))
        return step(*args, **kwargs)

    monkeypatch.setattr(loop, "optimizer_step", counting_step)
    state = build_state(cfg, build_model(cfg.model, cfg.data.scale), torch.device("cpu"))
    no_sync = contextlib.nullcontext
    loop._train(state, cfg, LoopContext(str(tmp_path)), Progress(), 0, None, no_sync, no_sync)
    assert state.step == 2
    assert during and min(during) >= 1  # Ray Data still names them so (else this test is blind)
    assert iterator_threads(before) == []
