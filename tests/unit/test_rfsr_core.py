from __future__ import annotations

import numpy as np
import pytest
import torch

from rfsr_ray.models import build_model, load_model
from rfsr_ray.models.diffusion import x0_from_model_output
from rfsr_ray.schedule import resolve_windows
from rfsr_ray.train.step import Batch, build_state, latent_at_index, optimizer_step, rfsr_loss
from tests.unit.helpers import fixed_batch, tiny_config


@pytest.fixture(scope="module")
def cfg():
    return tiny_config()


def make_state(cfg, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.data.scale)
    return build_state(cfg, model, torch.device("cpu"))


def test_gradients_reach_exactly_the_trainable_parameters(cfg):
    state = make_state(cfg)
    model = state.model
    output = rfsr_loss(model, state.losses, fixed_batch(), 6, cfg, torch.Generator().manual_seed(0))
    output.loss.backward()
    trainable = {id(p) for p in model.trainable_parameters()}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.unet.parameters())
    for parameter in model.parameters():
        if id(parameter) not in trainable:
            assert parameter.grad is None
    for parameter in state.losses.parameters():
        assert parameter.grad is None


def test_reference_is_frozen_and_ema_follows_its_formula(cfg):
    state = make_state(cfg)
    model = state.model
    reference_before = {k: v.clone() for k, v in model.reference_unet.state_dict().items()}
    for _ in range(3):
        shadow = [p.clone() for p in state.ema.shadow_params]
        decay = state.ema.get_decay(state.ema.optimization_step + 1)
        optimizer_step(state, [fixed_batch()], cfg)
        for old, new, param in zip(shadow, state.ema.shadow_params, state.params, strict=True):
            torch.testing.assert_close(new, decay * old + (1 - decay) * param.detach())
    for key, value in model.reference_unet.state_dict().items():
        assert torch.equal(value, reference_before[key]), key
    moved = any(
        not torch.equal(p, reference_before[f"{n}"]) for n, p in model.unet.state_dict().items()
    )
    assert moved


@pytest.mark.parametrize("index", [0, 2, 3, 5, 6, 7])
def test_only_active_losses_contribute(cfg, index):
    state = make_state(cfg)
    output = rfsr_loss(
        state.model, state.losses, fixed_batch(), index, cfg, torch.Generator().manual_seed(0)
    )
    names = {name for name in output.terms if name.startswith("loss_")}
    windows = {"loss_structure": (0, 2), "loss_reward_gmsd": (5, 7), "loss_gram": (6, 7)}
    expected = {name for name, (low, high) in windows.items() if low <= index <= high}
    assert names == expected
    total = sum(float(v) for k, v in output.terms.items() if k.startswith("loss_"))
    assert float(output.loss.detach()) == pytest.approx(total, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_trajectory_latent_equals_the_models_own_sampler(sampler):
    cfg = tiny_config(model={"sampler": sampler})
    model = make_state(cfg).model
    batch = fixed_batch()
    condition = model.condition(batch.lr_image)
    timesteps = model.set_timesteps(8)
    ours = latent_at_index(
        model, condition, timesteps, 5, "trajectory", torch.Generator().manual_seed(3)
    )
    generator = torch.Generator().manual_seed(3)
    latent = torch.randn(condition.shape, generator=generator)
    with torch.no_grad():
        for timestep in model.scheduler.timesteps[:5]:
            output = model.unet(torch.cat([latent, condition], 1), timestep).sample
            latent = model.scheduler.step(output, timestep, latent, generator=generator).prev_sample
    torch.testing.assert_close(ours, latent)
    one_step = latent_at_index(
        model, condition, timesteps, 5, "one_step", torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(
        one_step, torch.randn(condition.shape, generator=torch.Generator().manual_seed(3))
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_equals_scheduler_pred_original_sample(prediction_type):
    cfg = tiny_config(model={"tiny": {"prediction_type": prediction_type}})
    model = make_state(cfg).model
    model.set_timesteps(8)
    latent = torch.randn(2, 3, 32, 32)
    output = torch.randn(2, 3, 32, 32)
    for timestep in model.scheduler.timesteps[[0, 3, 7]]:
        ours = x0_from_model_output(model.scheduler, output, timestep, latent)
        theirs = model.scheduler.step(output, timestep, latent).pred_original_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_few_rfsr_steps_lower_the_loss_and_stay_finite():
    cfg = tiny_config(
        losses={
            "structure": {"window": [3, 3]},
            "reward": {"window": [3, 3]},
            "gram": {"window": [3, 3], "weight": 0.1},
        },
        train={"lr": 3e-4},
    )
    state = make_state(cfg)
    batch = fixed_batch()

    def evaluate() -> float:
        with torch.no_grad():
            output = rfsr_loss(
                state.model, state.losses, batch, 3, cfg, torch.Generator().manual_seed(0)
            )
        return float(output.loss)

    before = evaluate()
    for _ in range(12):
        state.generator.manual_seed(0)  # same x_T every step: a fixed objective to descend
        result = optimizer_step(state, [batch], cfg)
        assert not result.skipped and np.isfinite(result.grad_norm)
        assert all(np.isfinite(v) for v in result.terms.values())
        assert result.indices == [3]
    assert evaluate() < 0.97 * before


def test_denoise_loss_falls():
    cfg = tiny_config(train={"loss": "denoise"})
    state = make_state(cfg)
    assert state.losses is None  # no RFSR loss modules for the plain diffusion objective
    batch = fixed_batch()

    def evaluate() -> float:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return float(state.model.denoise_loss(batch.hr_image, batch.lr_image, generator))

    before = evaluate()
    for step in range(8):
        state.generator.manual_seed(0)  # the same noise and timesteps: a fixed objective
        result = optimizer_step(state, [batch], cfg)
        assert not result.skipped and np.isfinite(result.grad_norm)
        assert set(result.terms) == {"loss", "loss_denoise"} and result.indices == []
        if step == 0:  # the step descends the objective evaluated here
            assert result.terms["loss"] == pytest.approx(before, rel=1e-5)
    assert evaluate() < 0.9 * before


def test_nonfinite_gradients_skip_then_stop(cfg):
    from rfsr_ray.errors import TrainingError

    cfg = tiny_config(train={"max_nonfinite_steps": 2})
    state = make_state(cfg)
    before = [p.clone() for p in state.params]
    bad = Batch(fixed_batch().lr_image, torch.full((2, 3, 32, 32), float("nan")))
    state.index_rng = np.random.default_rng(0)
    state.losses.windows.probabilities[:] = 0
    state.losses.windows.probabilities[0] = 1  # structure window: uses the NaN HR image
    result = optimizer_step(state, [bad], cfg)
    assert result.skipped and state.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, state.params, strict=True))
    with pytest.raises(TrainingError, match="2 consecutive"):
        optimizer_step(state, [bad], cfg)


def test_save_and_load_round_trip(cfg, tmp_path):
    model = make_state(cfg).model
    model.save(tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    lr = fixed_batch().lr_image
    first = model.sample(lr, 4, torch.Generator().manual_seed(0))
    second = loaded.sample(lr, 4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(first, second)
    assert first.shape == (2, 3, 32, 32) and first.min() >= 0 and first.max() <= 1


def test_windows_sampling_and_split(cfg):
    windows = resolve_windows(cfg)
    draws = {windows.sample(np.random.default_rng(i)) for i in range(200)}
    assert draws == {0, 1, 2, 5, 6, 7}
    split = tiny_config(schedule={"split": {"structure_end": 3, "reward_start": 6}})
    resolved = resolve_windows(split).windows
    assert resolved == {"structure": (0, 3), "reward": (6, 7), "gram": (6, 7)}


def test_schedule_errors_name_the_window():
    from rfsr_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"losses\.gram\.window=\[7, 3\].*ascending"):
        tiny_config(losses={"gram": {"window": [7, 3]}})
    with pytest.raises(ConfigError, match=r"losses\.structure\.window=\[0, 9\]"):
        tiny_config(losses={"structure": {"window": [0, 9]}})
    with pytest.raises(ConfigError, match=r"structure_end=5 must be < split\.reward_start=4"):
        tiny_config(schedule={"split": {"structure_end": 5, "reward_start": 4}})
    none = {name: {"enabled": False} for name in ("structure", "reward", "gram")}
    with pytest.raises(ConfigError, match="no RFSR loss is enabled"):
        tiny_config(losses=none)
    with pytest.raises(ConfigError, match="leave no index to sample"):
        tiny_config(schedule={"window_weights": {"structure": 0, "reward": 0, "gram": 0}})
