"""The optimiser step as a real run takes it: DDP all-reduces once per optimiser step under
gradient accumulation, and the EMA decay is the reference's constant one."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from rfsr_ray.config import build_config
from rfsr_ray.models import build_model
from rfsr_ray.train.step import build_state, optimizer_step
from tests.unit.helpers import fixed_batch, tiny_config


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _count_allreduces(rank: int, world: int, port: int, out: str) -> None:
    """One rank: optimiser steps with grad_accum 1, then 2; writes the bucket all-reduce count
    of each step (counted by a DDP communication hook) to `out`/rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    counts = []
    for accum in (1, 2):
        cfg = tiny_config(train={"grad_accum": accum})
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.data.scale)
        state = build_state(cfg, model, torch.device("cpu"), rank)
        calls = [0]

        def hook(calls, bucket):
            calls[0] += 1
            tensor = bucket.buffer().div_(world)
            return dist.all_reduce(tensor, async_op=True).get_future().then(lambda f: f.value()[0])

        def wrap(module, calls=calls, hook=hook):
            ddp = DistributedDataParallel(module)
            ddp.register_comm_hook(calls, hook)
            return ddp

        wrapped = model.wrap_trainable(wrap)

        @contextlib.contextmanager
        def no_sync(wrapped=wrapped):
            with contextlib.ExitStack() as stack:
                for ddp in wrapped.values():
                    stack.enter_context(ddp.no_sync())
                yield

        batches = [fixed_batch(seed=rank * 10 + i) for i in range(accum)]
        optimizer_step(state, batches, cfg, no_sync=no_sync)
        counts.append(calls[0])
    Path(out, str(rank)).write_text(" ".join(map(str, counts)))
    dist.destroy_process_group()


def test_gradient_accumulation_all_reduces_once_per_optimizer_step(tmp_path):
    """With 2 gloo ranks, a step over 2 micro-batches makes as many bucket all-reduces as a
    step over 1: the first micro-batch's forward and backward both run under no_sync."""
    # fork, not spawn: the ranks inherit the imported torch and models instead of importing
    # them again (27 s → a few seconds on 2 cores); they start no threads before gloo does.
    mp.start_processes(
        _count_allreduces,
        args=(2, _free_port(), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    for rank in (0, 1):
        single, accumulated = map(int, (tmp_path / str(rank)).read_text().split())
        assert single >= 1
        assert accumulated == single, f"rank {rank}: {accumulated} all-reduces, expected {single}"


def test_constant_ema_decay_is_the_configured_one_from_the_first_update():
    cfg = tiny_config(train={"ema_decay": 0.9})
    assert cfg.train.ema_schedule == "constant"
    torch.manual_seed(0)
    state = build_state(cfg, build_model(cfg.model, cfg.data.scale), torch.device("cpu"))
    for _ in range(3):
        shadow = [p.clone() for p in state.ema.shadow_params]
        optimizer_step(state, [fixed_batch()], cfg)
        for old, new, param in zip(shadow, state.ema.shadow_params, state.params, strict=True):
            torch.testing.assert_close(new, 0.9 * old + 0.1 * param.detach())


@pytest.mark.parametrize(
    ("schedule", "updates", "expected"),
    [("constant", 1000, 0.999), ("constant", 1, 0.999), ("ramp", 1000, 1000 / 1009)],
)
def test_ema_schedules(schedule, updates, expected):
    """`ramp` is diffusers' warm-up, (1 + n)/(10 + n) for n = updates − 1: 0.991 at step 1000."""
    from rfsr_ray.train.step import build_ema

    cfg = build_config({"train": {"ema_decay": 0.999, "ema_schedule": schedule}})
    ema = build_ema([torch.nn.Parameter(torch.zeros(2))], cfg.train)
    assert ema.get_decay(updates) == pytest.approx(expected)


def test_ema_weights_swap_in_without_a_copy_and_restore_the_trained_ones():
    from rfsr_ray.train.loop import ema_weights

    cfg = tiny_config(train={"ema_decay": 0.5})
    torch.manual_seed(0)
    state = build_state(cfg, build_model(cfg.model, cfg.data.scale), torch.device("cpu"))
    optimizer_step(state, [fixed_batch()], cfg)
    optimizer_step(state, [fixed_batch(seed=1)], cfg)
    trained = [p.detach().clone() for p in state.params]
    shadow = [s.clone() for s in state.ema.shadow_params]
    assert any(not torch.equal(a, b) for a, b in zip(trained, shadow, strict=True))
    shadow_storage = [s.data_ptr() for s in state.ema.shadow_params]
    with ema_weights(state):
        for param, expected, pointer in zip(state.params, shadow, shadow_storage, strict=True):
            assert torch.equal(param, expected)
            assert param.data_ptr() == pointer  # the shadow's own storage: nothing copied
    for param, expected in zip(state.params, trained, strict=True):
        assert torch.equal(param, expected)
    for copy, expected in zip(state.ema.shadow_params, shadow, strict=True):
        assert torch.equal(copy, expected)


def test_bare_no_on_the_command_line_means_no_mixed_precision():
    from rfsr_ray.config import load_config

    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
