"""What every diffusers-based family shares: the sampling loop and the parameterisation."""

from __future__ import annotations

import functools
from collections.abc import Callable
from itertools import pairwise

import torch
from diffusers import SchedulerMixin

from rfsr_ray.errors import ConfigError
from rfsr_ray.models.protocol import ISRDiffusionModel

SamplerStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) → x_{t-1}


def run_sampler(step: SamplerStep, latent: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """`latent` after one `step(latent, timestep)` per entry of `timesteps` (noisiest first):
    x_T → x_0 over the whole schedule, or x_T → the latent at sampler index i over
    `timesteps[:i]`. The one sampling loop of the project."""
    for timestep in timesteps:
        latent = step(latent, timestep)
    return latent


@torch.no_grad()
def sample_sr(
    model: ISRDiffusionModel,
    lr_image: torch.Tensor,
    num_inference_steps: int,
    generator: torch.Generator | None,
    reference: bool,
) -> torch.Tensor:
    """Every family's `sample`: LR (B, 3, h, w) in [0, 1] → SR (B, 3, h·s, w·s) in [0, 1].

    The order is the diffusers pipelines' (condition, timesteps, x_T, N steps, decode), so a
    generator is drawn from in the same order and a family reproduces its pipeline.
    """
    condition = model.condition(lr_image, generator, mode="sample")
    timesteps = model.set_timesteps(num_inference_steps)
    latent = model.start_latent(condition, generator)
    step = functools.partial(
        model.sampler_step, condition=condition, generator=generator, reference=reference
    )
    return model.decode(run_sampler(step, latent, timesteps))


def alpha_bar(
    scheduler: SchedulerMixin, timestep: torch.Tensor, like: torch.Tensor
) -> torch.Tensor:
    """ᾱ_t broadcast to `like`'s shape (B, C, H, W), in `like`'s dtype and device."""
    alphas = scheduler.alphas_cumprod.to(device=like.device, dtype=torch.float32)
    value = alphas[timestep.to(like.device).long()].flatten()
    while value.dim() < like.dim():
        value = value.unsqueeze(-1)
    return value.to(like.dtype)


def x0_from_model_output(
    scheduler: SchedulerMixin,
    model_output: torch.Tensor,
    timestep: torch.Tensor,
    sample: torch.Tensor,
) -> torch.Tensor:
    """x̂0 from the denoiser output, as the scheduler's own `pred_original_sample`.

    epsilon: (x_t − √(1−ᾱ)·ε̂)/√ᾱ;  v_prediction: √ᾱ·x_t − √(1−ᾱ)·v̂;  sample: the output itself.
    """
    prediction_type = scheduler.config.prediction_type
    abar = alpha_bar(scheduler, timestep, sample)
    if prediction_type == "epsilon":
        return (sample - (1 - abar).sqrt() * model_output) / abar.sqrt()
    if prediction_type == "v_prediction":
        return abar.sqrt() * sample - (1 - abar).sqrt() * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def denoise_target(
    scheduler: SchedulerMixin, clean: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor
) -> torch.Tensor:
    """What the denoiser should output for the standard objective (ε, v or x0)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(clean, noise, timestep)
    if prediction_type == "sample":
        return clean
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def is_variance_preserving(scheduler: SchedulerMixin) -> bool:
    """Whether x_t = √ᾱ·x0 + √(1−ᾱ)·ε, the parameterisation RFSR's x̂0 uses; sigma-space
    samplers (Euler, Heun, LMS: init_noise_sigma ≠ 1) scale x_t differently."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    return alphas is not None and float(scheduler.init_noise_sigma) == 1.0


def timesteps_problem(
    timesteps: torch.Tensor, num_inference_steps: int, num_train_timesteps: int
) -> str | None:
    """What keeps `timesteps` from being one training timestep per sampler index, or None.

    RFSR's loss windows and index sampling address the schedule by index 0..N-1, so the
    N-step schedule must be N distinct, strictly descending integers in [0, T-1].
    """
    values = timesteps.detach().flatten().cpu().tolist()
    if not all(float(v).is_integer() for v in values):
        return "non-integer timesteps"
    ints = [int(v) for v in values]
    repeated = sorted({v for v in ints if ints.count(v) > 1}, reverse=True)
    repeats = f" ({', '.join(map(str, repeated))} repeated)" if repeated else ""
    if len(ints) != num_inference_steps:
        return f"{len(ints)} timesteps for {num_inference_steps} steps{repeats}"
    if repeated:
        return f"repeated timesteps{repeats}"
    if any(later >= earlier for earlier, later in pairwise(ints)):
        return "timesteps that do not strictly descend"
    if ints and (min(ints) < 0 or max(ints) >= num_train_timesteps):
        return f"timesteps outside [0, {num_train_timesteps - 1}]"
    return None


def checked_timesteps(
    scheduler: SchedulerMixin,
    num_inference_steps: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """`scheduler.set_timesteps(N)` and its timesteps, (N,) descending (index 0 the noisiest),
    refused with a `ConfigError` unless they are N distinct integers, one per sampler index.

    Every family's `set_timesteps` goes through here, so no scheduler whose list differs from
    its index range (PNDM with skip_prk_steps gives N+1 with one repeat) ever drives training.
    """
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    problem = timesteps_problem(
        timesteps, num_inference_steps, scheduler.config.num_train_timesteps
    )
    if problem is not None:
        raise ConfigError(
            f"{type(scheduler).__name__}.set_timesteps({num_inference_steps}) gives {problem}; "
            f"RFSR needs {num_inference_steps} distinct, strictly descending integer timesteps "
            "(one per sampler index): set model.sampler=ddim (or ddpm)"
        )
    return timesteps
