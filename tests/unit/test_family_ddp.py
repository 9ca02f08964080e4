"""Each latent family's trained modules under DDP, as a Ray Train worker group wraps them: two
gloo ranks (forked from this process, so they inherit its imports) train two optimiser steps of
two micro-batches each on different data, through the loop's own `wrap_for_ddp` with
DistributedDataParallel as Ray's `prepare_model` builds it on a CPU. DDP fails loudly on what a
family can get wrong: a parameter marked ready twice (gradient checkpointing), a trained
parameter that gets no gradient (checked at the next forward), modules wrapped that do not train.
After the steps both ranks hold the same weights, moved from the start: the gradients were
averaged across the ranks.

The families' fine-tunes through Ray Train and `pipelines/finetune.py` run in Train's local mode
in tests/integration/test_latent_training.py and test_seesr_training.py; the Ray Train worker
group itself (2 DDP workers, a killed one, a plug-in family) in test_demo_run.py,
test_worker_failure.py and test_started_cluster.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from rfsr_ray.config import RFSRConfig
from rfsr_ray.models import build_model
from rfsr_ray.testing.tiny_components import TINY_TAGGER, save_tiny_components
from rfsr_ray.train.loop import wrap_for_ddp
from rfsr_ray.train.step import Batch, build_state, optimizer_step
from tests.unit.helpers import latent_config, pair

CPU = torch.device("cpu")
CASES = {
    # Full UNet fine-tune with gradient checkpointing: DDP must not see a parameter twice.
    "sd_upscaler": {"memory": {"gradient_checkpointing": True}},
    # LoRA on both the ControlNet and the UNet, SeeSR's LR-latent start, prompts per sample
    # with prompt dropout.
    "controlnet_sr": {
        "finetune": "lora",
        "lora": {"enabled": True, "rank": 4, "apply_to": ["unet", "controlnet"]},
        "controlnet_sr": {"start": "lr_latent"},
        "prompt": {"text": "a sharp photo", "drop_prob": 0.5},
    },
    # The reference's trainable set: the ControlNet and the UNet's image attention; the model
    # tags its LR input with its own DAPE tagger.
    "seesr": {},
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("components")
    return {family: save_tiny_components(family, root / family) for family in CASES}


def family_config(folders: dict[str, Path], family: str) -> RFSRConfig:
    model = dict(CASES[family])
    if family == "seesr":
        files = {key: str(folders[family] / name) for key, name in TINY_TAGGER.items()}
        model["seesr"] = {"tagger_size": "tiny", **files}
    return latent_config(folders, family, train={"grad_accum": 2}, **model)


def _train_rank(rank: int, world: int, cfg: RFSRConfig, out: str) -> None:
    """One rank: the same start weights, its own micro-batches; saves its weights before and
    after two optimiser steps. The ranks meet through a file store (a TCP port picked in
    advance could be taken by the other xdist process meanwhile)."""
    store = Path(out) / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.data.scale)
        state = build_state(cfg, model, CPU, rank)
        no_sync = wrap_for_ddp(state, DistributedDataParallel)
        start = [param.detach().clone() for param in state.params]
        for step in range(2):
            micro_batches = []
            for micro in range(cfg.train.grad_accum):
                lr_image, hr_image = pair(seed=100 * rank + 10 * step + micro)
                micro_batches.append(Batch(lr_image, hr_image, ["a cat", ""]))
            optimizer_step(state, micro_batches, cfg, no_sync=no_sync)
        trained = [param.detach().clone() for param in state.params]
        checkpointing = getattr(model.unet, "is_gradient_checkpointing", False)
        torch.save({"start": start, "trained": trained, "checkpointing": checkpointing},
                   Path(out) / f"rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family", list(CASES))
def test_two_ddp_ranks_train_the_family_in_step(folders, family, tmp_path):
    cfg = family_config(folders, family)
    # fork, not spawn: the ranks inherit the imported torch and diffusers instead of importing
    # them again (~10 s each on 2 cores); they start no threads before gloo does.
    mp.start_processes(
        _train_rank,
        args=(2, cfg, str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert ranks[0]["checkpointing"] == (family == "sd_upscaler")
    assert len(ranks[0]["trained"]) == len(ranks[1]["trained"]) > 0
    start, zero, one = ranks[0]["start"], ranks[0]["trained"], ranks[1]["trained"]
    for weights_zero, weights_one in zip(zero, one, strict=True):
        torch.testing.assert_close(weights_zero, weights_one, rtol=0, atol=1e-7)  # averaged
    moved = [not torch.equal(before, after) for before, after in zip(start, zero, strict=True)]
    assert all(moved)  # every trained tensor got a gradient and moved
