"""`losses.decode_crop` (issue 16 section 4): x̂0 is decoded with gradient only on a seeded
random window, and the HR, LR and Gram reference are cropped to the same window."""

from __future__ import annotations

import functools

import pytest
import torch

from rfsr_ray.errors import ConfigError
from rfsr_ray.models import build_model
from rfsr_ray.train.step import build_state, decode_window, rfsr_loss
from tests.unit.helpers import fixed_batch, tiny_config

GRAM_INDEX = 6  # reward (5-7) and Gram (6-7) windows of tiny_config: every input is cropped


class Spy:
    """The step's losses, recording what they were given."""

    def __init__(self, losses):
        self.losses, self.calls = losses, []

    def __getattr__(self, name):
        return getattr(self.losses, name)

    def __call__(self, index, sr, hr, lr, reference, prompts):
        self.calls.append((sr.detach(), hr, lr, reference))
        return self.losses(index, sr, hr, lr, reference, prompts)


@functools.cache
def state_for(crop):
    """Built once per crop (its random VGG19 is the slow part); a loss call changes no state."""
    cfg = tiny_config(losses={"decode_crop": crop})
    torch.manual_seed(0)
    return cfg, build_state(cfg, build_model(cfg.model, cfg.data.scale), torch.device("cpu"))


def loss_with(crop, seed=0):
    cfg, state = state_for(crop)
    spy = Spy(state.losses)
    batch = fixed_batch()
    generator = torch.Generator().manual_seed(seed)
    output = rfsr_loss(state.model, spy, batch, GRAM_INDEX, cfg, generator)
    return output, spy.calls[0], batch


def test_a_crop_of_the_whole_image_gives_the_uncropped_loss():
    whole, (sr, *_), _ = loss_with(None)
    cropped, (sr_cropped, *_), _ = loss_with(32)
    assert sr.shape == sr_cropped.shape == (2, 3, 32, 32)
    assert torch.equal(whole.loss, cropped.loss)
    assert whole.terms == cropped.terms


def test_every_input_of_the_losses_is_the_same_window():
    windows = set()
    for seed in range(4):
        output, (sr, hr, lr, reference), batch = loss_with(16, seed)
        assert sr.shape == reference.shape == (2, 3, 16, 16) and lr.shape == (2, 3, 4, 4)
        matches = [
            (top, left)
            for top in range(0, 17, 4)
            for left in range(0, 17, 4)
            if torch.equal(hr, batch.hr_image[..., top : top + 16, left : left + 16])
            and torch.equal(
                lr, batch.lr_image[..., top // 4 : top // 4 + 4, left // 4 : left // 4 + 4]
            )
        ]
        assert len(matches) == 1, "HR and LR must be one window, on whole LR pixels"
        windows.add(matches[0])
        again, (sr_again, *_), _ = loss_with(16, seed)
        assert torch.equal(sr_again, sr) and torch.equal(again.loss, output.loss)  # seeded
    assert len(windows) > 1  # the window moves with the seed


def test_latent_windows_align_with_the_vae_factor_and_the_lr():
    x0 = torch.zeros(1, 4, 16, 16)  # a latent family: 8 HR pixels per latent pixel
    hr, lr = torch.rand(1, 3, 128, 128), torch.rand(1, 3, 32, 32)
    window = decode_window(x0, hr, lr, 64, torch.Generator().manual_seed(3))
    assert window.latent(x0).shape[-1] == 8
    top, left = window.top * 8, window.left * 8
    assert torch.equal(window.hr(hr), hr[..., top : top + 64, left : left + 64])
    assert torch.equal(window.lr(lr), lr[..., top // 4 : top // 4 + 16, left // 4 : left // 4 + 16])
    with pytest.raises(ConfigError, match="multiple of 8 HR pixels"):
        decode_window(x0, hr, lr, 60, None)


def test_the_config_refuses_a_crop_larger_than_the_patch_or_off_the_lr_grid():
    with pytest.raises(ConfigError, match=r"decode_crop=48 must be at most data.patch_size=32"):
        tiny_config(losses={"decode_crop": 48})
    with pytest.raises(ConfigError, match=r"multiple of data.scale=4, e.g. 16"):
        tiny_config(losses={"decode_crop": 18})
