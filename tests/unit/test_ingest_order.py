"""The same seeds give each rank the same pairs in the same order (`data.deterministic`): Ray Data
keeps block order, the split ignores locality, and each worker's local shuffle is seeded by rank
and pass. Measured through finetune.py (2 workers, 2 steps, the same config twice): before, the
first step's loss was 0.227 and 0.225; with this, 0.2215 both times."""

from __future__ import annotations

import numpy as np
import torch

from rfsr_ray.config import build_config
from rfsr_ray.train.driver import ingest_config
from rfsr_ray.train.loop import _batches


def test_ingest_keeps_order_and_ignores_locality_unless_turned_off():
    on = ingest_config(build_config({}))
    assert on._user_execution_options.preserve_order is True
    assert on._enable_shard_locality is False
    off = ingest_config(build_config({"data": {"deterministic": False}}))
    assert off._user_execution_options.preserve_order is False
    assert off._enable_shard_locality is True


class RecordingShard:
    """A shard that records the arguments of each pass and yields one batch of 2 pairs."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def iter_batches(self, **kwargs):
        self.calls.append(kwargs)
        rows = {
            "lr": np.zeros((2, 4, 4, 3), np.uint8),
            "hr": np.zeros((2, 16, 16, 3), np.uint8),
            "epoch": np.zeros(2, np.int64),
        }
        yield rows


def shuffle_seeds(rank: int, passes: int) -> list[int]:
    cfg = build_config({"train": {"batch_size": 2}})
    shard = RecordingShard()
    stream = _batches(shard, cfg, torch.device("cpu"), rank)
    for _ in range(2 * passes):  # a batch, then the end-of-pass marker
        next(stream)
    assert all(call["local_shuffle_buffer_size"] == 8 for call in shard.calls)
    return [call["local_shuffle_seed"] for call in shard.calls]


def test_local_shuffle_is_seeded_by_rank_and_pass():
    rank0 = shuffle_seeds(0, passes=2)
    assert rank0 == shuffle_seeds(0, passes=2)  # the same in every run
    assert rank0[0] != rank0[1]  # a new order each pass
    assert set(rank0).isdisjoint(shuffle_seeds(1, passes=2))  # and each rank
    assert all(seed is not None and 0 <= seed < 2**32 for seed in rank0)


class EndlessShard:
    """A shard whose passes never end; records whether the loop closed its iterator."""

    def __init__(self) -> None:
        self.closed = False

    def iter_batches(self, **kwargs):
        rng = np.random.default_rng(0)
        try:
            while True:
                hr = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
                yield {"lr": hr[:, ::4, ::4].copy(), "hr": hr, "epoch": np.zeros(2, np.int64)}
        finally:
            self.closed = True


def test_the_loop_closes_its_data_stream_when_training_ends(tmp_path, monkeypatch):
    """Closed while Ray runs: in Train's local mode (`train.num_workers=0`, the loop in the
    driver) an open Ray Data iterator was closed by the garbage collector after ray.shutdown,
    and every such run ended with two "Ray is not initialized" tracebacks."""
    import contextlib

    import ray.train

    from rfsr_ray.models import build_model
    from rfsr_ray.train import loop
    from rfsr_ray.train.checkpoint import Progress
    from rfsr_ray.train.context import LoopContext
    from rfsr_ray.train.step import build_state
    from tests.unit.helpers import tiny_config

    cfg = tiny_config(
        losses={"gram": {"enabled": False}},
        train={"steps": 2, "num_workers": 0, "checkpoint_every": 2, "validate_every": 2},
    )
    shard, reports, streams = EndlessShard(), [], []
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: shard)
    batches = loop._batches

    def held(*args):  # something else holds the stream, as Ray's iterator machinery does:
        streams.append(batches(*args))  # freeing the loop's reference does not close it
        return streams[-1]

    monkeypatch.setattr(loop, "_batches", held)
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kwargs: reports.append(metrics))
    state = build_state(cfg, build_model(cfg.model, cfg.data.scale), torch.device("cpu"))
    no_sync = contextlib.nullcontext
    loop._train(state, cfg, LoopContext(str(tmp_path)), Progress(), 0, None, no_sync, no_sync)
    assert state.step == 2 and [r["step"] for r in reports] == [2]
    assert shard.closed


def test_the_loop_waits_for_ray_data_threads_still_fetching_when_training_ends(caplog):
    """A Ray Data iterator thread that is fetching when the iterator closes calls Ray once more;
    after ray.shutdown that call ends the process with exit code 1. The loop waits for the
    threads its stream started (here one that takes 0.5 s to finish its fetch), not for others,
    and gives up with a warning after its timeout."""
    import threading
    import time

    from rfsr_ray.train.loop import RAY_DATA_ITERATOR_THREAD, _join_data_threads

    def fetcher(seconds: float) -> threading.Thread:
        thread = threading.Thread(target=time.sleep, args=(seconds,), daemon=True)
        thread.name = RAY_DATA_ITERATOR_THREAD
        thread.start()
        return thread

    older = fetcher(3.0)  # another iterator's, started before the loop's stream
    before = set(threading.enumerate())
    fetching = fetcher(0.5)
    _join_data_threads(before)
    assert not fetching.is_alive()
    assert older.is_alive()

    stuck = fetcher(3.0)
    _join_data_threads(before, timeout_s=0.2)
    assert stuck.is_alive()  # given up on (after 0.2 s), with a warning
    assert "1 Ray Data iterator thread(s) still fetching" in caplog.text
