"""Parameterisation helpers shared by every diffusers-based family."""

from __future__ import annotations

import torch
from diffusers import SchedulerMixin


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
