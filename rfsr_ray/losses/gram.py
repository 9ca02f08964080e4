"""Gram regulariser between x̂0 of the trained model and x̂0 of the frozen original model.

Features: torchvision VGG19 at conv1_2, conv2_2, conv3_4, conv4_4, conv5_4, pre-ReLU, on
ImageNet-normalised input. Each feature map is layer-normalised (zero mean, unit variance over
(C, H, W)) and its Gram matrix G = F Fᵀ / (C·H·W) is taken, in fp32.

Variants:
- `l1` (the reference code): Σ_l w_l · mean|G_l(x) − G_l(ref)|.
- `kl` (the paper's "Gram-KL"): each Gram row is standardised (zero mean, unit standard
  deviation over its C entries) and turned into a distribution over channels by a softmax with
  temperature τ, P = softmax(std_row(G(x))/τ), Q = softmax(std_row(G(ref))/τ), and
  Σ_l w_l · mean_rows KL(Q ‖ P). It is ≥ 0 and 0 exactly when the standardised rows agree.

Why standardise: G's entries are ~1/C (its trace is 1 by construction, C = 64…512), so
softmax(G/τ) at τ = 1 is uniform to ~1e-3 and KL, quadratic in the logit change, is ~1e-7 to
1e-10: the regulariser does nothing. A fixed τ cannot fix it for all five layers at once (their
scales differ by C). Standardised rows are O(1) in every layer, so τ is in units of a row's
standard deviation. On 128 px skimage photos with seeded random VGG19 features (no real weights
offline), KL(drifted)/KL(unrelated) is then 0.06–0.10 where l1's is 0.13–0.22 (τ = 1 unstandardised:
0.004–0.03); see tests/unit/test_losses.py. What standardising removes (each row's offset and
scale) still counts in `l1`; `kl` compares the pattern of each channel's co-activations.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rfsr_ray.config import GramLossConfig
from rfsr_ray.errors import WeightsError

log = logging.getLogger(__name__)

# Indices of conv1_2, conv2_2, conv3_4, conv4_4, conv5_4 in torchvision's vgg19().features.
VGG19_LAYERS = (2, 7, 16, 25, 34)
VGG19_FILE = "vgg19-dcbb9e9d.pth"  # torchvision's IMAGENET1K_V1 checkpoint name
VGG19_URL = f"https://download.pytorch.org/models/{VGG19_FILE}"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ROW_EPS = 1e-12  # variance floor when standardising Gram rows for `kl`


def vgg19_file(explicit: str | None) -> Path:
    """Where the VGG19 checkpoint is (or would be): the explicit path, else torchvision's cache."""
    if explicit:
        return Path(explicit).expanduser()
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    return torch_home / "hub" / "checkpoints" / VGG19_FILE


def find_vgg_weights(explicit: str | None) -> Path | None:
    """The VGG19 checkpoint: an explicit path, else torchvision's cache under $TORCH_HOME
    (`vgg19_file`, which `rfsr_ray.weights` checks too)."""
    path = vgg19_file(explicit)
    if explicit and not path.is_file():
        raise WeightsError(
            f"losses.gram.vgg_weights={explicit!r} does not exist; download torchvision's "
            f"{VGG19_FILE} on a machine with network access and copy it there"
        )
    return path if path.is_file() else None


class VGGFeatures(nn.Module):
    """Frozen VGG19 trunk returning the pre-ReLU maps of the five Gram layers."""

    def __init__(self, cfg: GramLossConfig, seed: int = 0) -> None:
        super().__init__()
        weights = find_vgg_weights(cfg.vgg_weights)
        if weights is None and not cfg.allow_random_vgg:
            raise WeightsError(
                f"VGG19 weights for the Gram regulariser not found (no losses.gram.vgg_weights, no "
                f"$TORCH_HOME/hub/checkpoints/{VGG19_FILE}). Copy torchvision's {VGG19_FILE} "
                "there, set losses.gram.vgg_weights, or set losses.gram.allow_random_vgg=true to "
                "run with seeded random features"
            )
        trunk = _trunk()
        if weights is not None:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            trunk.load_state_dict(
                {
                    k.removeprefix("features."): v
                    for k, v in state.items()
                    if k.startswith("features.")
                }
            )
        else:
            if trunk[0].weight.device.type != "meta":  # a FLOP count needs no values
                trunk.load_state_dict(_seeded_random_trunk(seed))
            # Per process (every rank builds one); the driver warns once (train/driver.py).
            log.info("Gram regulariser uses seeded RANDOM VGG19 features (allow_random_vgg)")
        for module in trunk:  # in-place ReLUs would overwrite the pre-ReLU maps we keep
            if isinstance(module, nn.ReLU):
                module.inplace = False
        self.trunk = trunk.requires_grad_(False).eval()
        self.random_weights = weights is None
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        features = []
        hidden = (image.float() - self.mean) / self.std
        for index, layer in enumerate(self.trunk):
            hidden = layer(hidden)
            if index in VGG19_LAYERS:
                features.append(hidden)
        return features


def _trunk() -> nn.Sequential:
    """VGG19's layers up to conv5_4, uninitialised, on the current default device."""
    # Imported here: the driver and `weights.py` use this module's paths only, and
    # torchvision's models cost them ~1.5 s of import.
    from torchvision.models import vgg19

    device = torch.empty(0).device  # the caller's default device (a FLOP count uses meta)
    with torch.device("meta"):  # structure only: torchvision would initialise every weight
        trunk = vgg19(weights=None).features[: VGG19_LAYERS[-1] + 1]
    return trunk.to_empty(device=device)


@functools.cache
def _seeded_random_trunk(seed: int) -> dict[str, torch.Tensor]:
    """The trunk's weights as torchvision's random initialisation of vgg19 makes them under
    `seed` (CPU tensors), computed once per process: it also draws the 123 M classifier
    weights (~1.5 s of CPU), and a process builds the regulariser more than once (the losses
    and the validator; the unit tests dozens of times). Shared and read-only: callers copy it
    into their own trunk with `load_state_dict`."""
    from torchvision.models import vgg19

    with torch.device("cpu"), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trunk = vgg19(weights=None).features[: VGG19_LAYERS[-1] + 1]
    return trunk.state_dict()


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, C, C): Gram of layer-normalised features divided by C·H·W."""
    batch, channels, height, width = features.shape
    normalised = F.layer_norm(features.float(), features.shape[1:])
    flat = normalised.reshape(batch, channels, height * width)
    return flat @ flat.transpose(1, 2) / (channels * height * width)


def _standardised_rows(gram: torch.Tensor) -> torch.Tensor:
    """(B, C, C) → each row minus its mean, over its standard deviation. The tiny eps only
    keeps a constant row (a dead channel) finite: rows here have variances of 1e-9 or more."""
    return F.layer_norm(gram, gram.shape[-1:], eps=ROW_EPS)


def gram_distance(
    grams: list[torch.Tensor], reference_grams: list[torch.Tensor], cfg: GramLossConfig
) -> torch.Tensor:
    """Weighted `l1` or `kl` distance between per-layer Gram matrices: a (B,) tensor."""
    total = torch.zeros(grams[0].shape[0], device=grams[0].device)
    for weight, gram, reference in zip(cfg.layer_weights, grams, reference_grams, strict=True):
        if cfg.variant == "l1":
            term = (gram - reference).abs().mean(dim=(1, 2))
        else:
            log_p = F.log_softmax(_standardised_rows(gram) / cfg.temperature, dim=-1)
            log_q = F.log_softmax(_standardised_rows(reference) / cfg.temperature, dim=-1)
            term = (log_q.exp() * (log_q - log_p)).sum(-1).mean(-1)
        total = total + weight * term
    return total


class GramRegulariser(nn.Module):
    """`weight`-free Gram distance between x̂ and the frozen model's x̂, images in [0, 1]."""

    def __init__(self, cfg: GramLossConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.features = VGGFeatures(cfg, seed)

    def grams(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [gram_matrix(f) for f in self.features(image)]

    def forward(self, sr_image: torch.Tensor, reference_image: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of the Gram distance (scalar, fp32)."""
        with torch.no_grad():
            reference = self.grams(reference_image)
        return gram_distance(self.grams(sr_image), reference, self.cfg).mean()
