"""DDP wrappers sit beside the model: only the trained forward goes through them; the frozen
reference, state_dict, trainable_modules() and sampling after unwrap_trainable() never see them."""

from __future__ import annotations

import torch
from torch import nn

from rfsr_ray.models import build_model
from rfsr_ray.train.step import build_state, optimizer_step
from tests.unit.helpers import fixed_batch, tiny_config


class Counting(nn.Module):
    """A stand-in for DDP: forwards to the module and counts the calls."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


def test_trained_forward_runs_through_the_wrapper_and_nothing_else_sees_it():
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.scale)
    keys = set(model.state_dict())
    plain = model.unet
    wrappers = model.wrap_trainable(Counting)
    assert set(wrappers) == {"unet"} and wrappers["unet"].module is plain
    assert model.unet is plain and model.trainable_modules() == {"unet": plain}
    assert set(model.state_dict()) == keys  # the wrapper is not a registered submodule
    state = build_state(cfg, model, torch.device("cpu"))
    optimizer_step(state, [fixed_batch()], cfg)
    trained_calls = wrappers["unet"].calls
    assert trained_calls > 0
    model.sample(fixed_batch().lr_image, 2, torch.Generator().manual_seed(0), reference=True)
    assert wrappers["unet"].calls == trained_calls  # the frozen reference never goes through it
    model.unwrap_trainable()
    model.sample(fixed_batch().lr_image, 2, torch.Generator().manual_seed(0))
    assert wrappers["unet"].calls == trained_calls
