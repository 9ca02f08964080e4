"""Every random stream of a run, derived by name from one seed.

`np.random.SeedSequence(seed, spawn_key=(stream id, *keys))` gives statistically independent
streams: no stream is another plus an offset, and two streams never collide. Streams used:

- `data`: degradations and crops of one training pair (keys: source hash words, crop, epoch, use)
- `val_data`: the held-out validation pairs made from `data.val_source` (from `data.val_seed`
  where it is set)
- `shuffle`: each worker's local shuffle of its pairs (keys: rank, pass over the data)
- `index`: the sampler index of each micro-batch, the same on every rank (no keys)
- `noise`: x_T and the sampler's noise in training (keys: rank[, resume step])
- `validation`: x_T of every validation sample, the same at each validation
- `reward.<name>`: random crops or prompt dropout inside a reward (keys: call number)
- `init`: weights initialised from config, the same on every rank
- `python`, `numpy`: the global generators, for library code that draws from them (per rank)
"""

from __future__ import annotations

import random
import zlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that use it: Ray Data's processes (the pair tasks, the
# dataset manager, the split coordinator) import this module for NumPy streams only, and each
# would otherwise pay torch's import (~3 s of CPU on 2 cores) on every run.


def seed_sequence(seed: int, stream: str, *keys: int) -> np.random.SeedSequence:
    """The `SeedSequence` of `stream` (a name, e.g. "noise") under keys (e.g. the rank)."""
    return np.random.SeedSequence(seed, spawn_key=(zlib.crc32(stream.encode()), *keys))


def numpy_rng(seed: int, stream: str, *keys: int) -> np.random.Generator:
    return np.random.default_rng(seed_sequence(seed, stream, *keys))


def derive_seed(seed: int, stream: str, *keys: int) -> int:
    """A 63-bit integer seed for APIs that take one (torch, `DataConfig.seed`)."""
    state = seed_sequence(seed, stream, *keys).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def torch_generator(
    seed: int, stream: str, *keys: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    import torch

    return torch.Generator(device=device).manual_seed(derive_seed(seed, stream, *keys))


def seed_globals(seed: int, rank: int) -> None:
    """Seed Python's, NumPy's and torch's global generators, for library code that draws from
    them (our own streams never do). torch's is the same on every rank, so weights initialised
    from config agree before DDP broadcasts rank 0's."""
    random.seed(derive_seed(seed, "python", rank))
    np.random.seed(derive_seed(seed, "numpy", rank) % 2**32)
    import torch

    torch.manual_seed(derive_seed(seed, "init"))
