"""The contract every diffusion ISR model family implements for RFSR and for inference.

Image tensors at this boundary are `(B, 3, H, W)` float in [0, 1]; LR images are
`(B, 3, H/scale, W/scale)`. Latents are whatever the family diffuses in (pixels for `tiny`, VAE
latents for latent models). Timestep indices count sampler steps: index 0 is the noisiest.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from diffusers import SchedulerMixin
from torch import nn


@runtime_checkable
class ISRDiffusionModel(Protocol):
    family: str
    scale: int
    scheduler: SchedulerMixin

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters RFSR updates; everything else stays frozen."""
        ...

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Named modules holding the trainable parameters (what checkpoints save), always the
        plain modules, never their wrappers."""
        ...

    def wrap_trainable(self, wrap: Callable[[nn.Module], nn.Module]) -> dict[str, nn.Module]:
        """Run the trained forward passes through `wrap(module)` of each trainable module (DDP,
        whose forward prepares the gradient all-reduce); returns the wrappers by name. Nothing
        else changes: `trainable_modules()` and exports keep the plain modules
        (`rfsr_ray.models.wrapping.TrainableWrappers` implements it)."""
        ...

    def unwrap_trainable(self) -> None:
        """Undo `wrap_trainable`: forward passes run on the plain modules again."""
        ...

    def condition(
        self,
        lr_image: torch.Tensor,
        generator: torch.Generator | None = None,
        prompts: list[str] | None = None,
        mode: Literal["train", "denoise", "sample"] = "sample",
    ) -> Any:
        """Everything the denoiser needs besides the latent, built once per batch from LR.
        `prompts` are per-sample texts (latent families; None = the configured prompt). `train`
        (RFSR) and `denoise` (the standard objective) apply prompt dropout; `sample` and `train`
        apply classifier-free guidance (the training guidance for `train`), `denoise` never."""
        ...

    def start_latent(self, condition: Any, generator: torch.Generator | None) -> torch.Tensor:
        """x_T for the first sampler step (pure noise, or the LR latent noised, per family)."""
        ...

    def set_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """Configure the sampler for N steps; returns its N timesteps, noisiest first."""
        ...

    def sampler_step(
        self,
        latent: torch.Tensor,
        timestep: torch.Tensor,
        condition: Any,
        generator: torch.Generator | None,
        reference: bool = False,
    ) -> torch.Tensor:
        """One sampler step x_t → x_{t-1} without gradient, of the trained model or, with
        `reference=True`, of the frozen original."""
        ...

    def predict_x0(
        self,
        latent: torch.Tensor,
        timestep: torch.Tensor,
        condition: Any,
        reference: bool = False,
    ) -> torch.Tensor:
        """One-step x̂0 at `timestep` honouring the scheduler's prediction type. With gradient for
        the trained model; `reference=True` uses the frozen original model (no gradient)."""
        ...

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent → image (B, 3, H, W) in [0, 1], differentiable."""
        ...

    def sample(
        self,
        lr_image: torch.Tensor,
        num_inference_steps: int,
        generator: torch.Generator | None = None,
        reference: bool = False,
    ) -> torch.Tensor:
        """Full sampling: LR (B, 3, h, w) in [0, 1] → SR (B, 3, h*scale, w*scale) in [0, 1]."""
        ...

    def denoise_loss(
        self, hr_image: torch.Tensor, lr_image: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """The standard diffusion objective (ε- or v-MSE per prediction type), a scalar."""
        ...

    def save(self, path: str | Path) -> Path:
        """Write the trained model in the family's own format (a diffusers folder)."""
        ...
