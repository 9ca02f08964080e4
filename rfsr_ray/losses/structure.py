"""Low-frequency structure constraint: L1 between wavelet low-pass bands of x̂ and HR."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

with warnings.catch_warnings():
    # pytorch_wavelets imports pkg_resources, which warns on import that it is deprecated; it
    # works while setuptools<81 is pinned (pyproject), and only a new pytorch_wavelets can fix it.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    from pytorch_wavelets import DTCWTForward, DWTForward

from rfsr_ray.config import StructureLossConfig


class WaveletLowPass(nn.Module):
    """Low-pass band after `levels` wavelet levels: (B, C, H, W) → (B, C, ~H/2^J, ~W/2^J).

    `wavelet="dtcwt"` is the reference code's dual-tree complex wavelet transform
    (near_sym_b / qshift_b); any other name is a pywt wavelet for a plain DWT LL band.
    """

    def __init__(self, wavelet: str = "haar", levels: int = 3) -> None:
        super().__init__()
        if wavelet == "dtcwt":
            self.transform = DTCWTForward(J=levels, biort="near_sym_b", qshift="qshift_b")
        else:
            self.transform = DWTForward(J=levels, wave=wavelet, mode="symmetric")

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        low, _ = self.transform(image.float())
        return low


class StructureLoss(nn.Module):
    """`L1(LL(sr), LL(hr))`, images (B, 3, H, W) in [0, 1]; returns a scalar in fp32."""

    def __init__(self, cfg: StructureLossConfig) -> None:
        super().__init__()
        self.low_pass = WaveletLowPass(cfg.wavelet, cfg.levels)

    def forward(self, sr_image: torch.Tensor, hr_image: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(self.low_pass(sr_image), self.low_pass(hr_image))
