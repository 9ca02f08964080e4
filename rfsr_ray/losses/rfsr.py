"""All RFSR loss terms of a config, gated by the timestep windows."""

from __future__ import annotations

import torch
from torch import nn

from rfsr_ray.config import RFSRConfig
from rfsr_ray.losses.gram import GramRegulariser
from rfsr_ray.losses.rewards import build_reward
from rfsr_ray.losses.structure import StructureLoss
from rfsr_ray.schedule import LossWindows, resolve_windows


class RFSRLosses(nn.Module):
    """Computes the weighted loss terms active at a sampler index.

    Images are (B, 3, H, W) float in [0, 1]; every term is computed in fp32.
    """

    def __init__(self, cfg: RFSRConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        losses = cfg.losses
        self.cfg = losses
        self.windows: LossWindows = resolve_windows(cfg)
        self.structure = (
            StructureLoss(losses.structure) if "structure" in self.windows.windows else None
        )
        terms = (
            [build_reward(term, device, cfg.train.seed) for term in losses.reward.terms]
            if "reward" in self.windows.windows
            else []
        )
        self.rewards = nn.ModuleList(terms)
        self.gram = (
            GramRegulariser(losses.gram, cfg.train.seed) if "gram" in self.windows.windows else None
        )
        self.to(device)

    @property
    def needs_reference(self) -> bool:
        return self.gram is not None

    def forward(
        self,
        index: int,
        sr_image: torch.Tensor,
        hr_image: torch.Tensor,
        lr_image: torch.Tensor | None = None,
        reference_image: torch.Tensor | None = None,
        prompts: list[str] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and every term (losses `loss_*`, raw reward scores `score_*`), detached."""
        active = self.windows.active(index)
        sr_image = sr_image.float()
        total = sr_image.new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        if "structure" in active and self.structure is not None:
            value = self.cfg.structure.weight * self.structure(sr_image, hr_image.float())
            terms["loss_structure"], total = value.detach(), total + value
        if "reward" in active:
            for term in self.rewards:
                value, score = term(sr_image, hr=hr_image, lr=lr_image, prompt=prompts)
                name = term.cfg.name
                terms[f"loss_reward_{name}"], total = value.detach(), total + value
                terms[f"score_{name}"] = score.mean()
        if "gram" in active and self.gram is not None:
            if reference_image is None:
                raise ValueError("the Gram term is active but no reference image was given")
            value = self.cfg.gram.weight * self.gram(sr_image, reference_image.float())
            terms["loss_gram"], total = value.detach(), total + value
        return total, terms
