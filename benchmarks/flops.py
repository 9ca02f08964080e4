"""FLOP cost model of one RFSR step, part by part, for each latent family; the DDP index effect;
peak GPU memory of each reference recipe.

    .venv/bin/python benchmarks/flops.py            # counts (meta) + memory (fake tensors), ~40 s
    .venv/bin/python benchmarks/flops.py --measure  # + the tiny family timed on CPU vs its FLOPs
    .venv/bin/python benchmarks/flops.py --measure --device cuda   # GPU: real architectures, bf16

How each number is obtained:
- FLOPs: `torch.utils.flop_counter.FlopCounterMode` around each part, run on the meta device with
  the released architectures (benchmarks/latent_step.py's configs through its `real_model`, i.e.
  the project's `SDUpscalerModel` / `ControlNetSRModel`, with the recipe's `model` config:
  what trains, gradient checkpointing, guidance). No weights, nothing downloaded. Backward parts
  count what autograd really runs (weight gradients only where the recipe trains, checkpoint
  recomputation included). Rewards: pyiqa's `CLIPIQA` (RN50 CLIP built from its config by pyiqa's
  own `CLIP` class instead of `clip_model.load`, which downloads), the project's
  `ImageRewardModel` (BLIP ViT-L/16 + BERT), the project's `GramRegulariser` and `StructureLoss`.
- Expected step cost: each part's FLOPs times its expected calls per micro-batch: the rollout runs
  i sampler calls at index i (`timesteps[:i]`), i drawn from `schedule.resolve_windows`; a loss
  counts with the probability that its window holds i; one-step mode has no rollout.
- DDP: each rank draws its own index, so a micro-batch waits for the most expensive rank:
  E[max over R ranks of C(i)] from the exact index distribution (C(i) = cost at index i); with
  gradient accumulation the ranks meet once per optimiser step, so E[max_r Σ_micro C(i)].
- Memory: parameters, gradients, AdamW, EMA and the frozen reference copy counted exactly from
  the built modules (fp32, as the project keeps them); activations measured by running the
  gradient step (micro-batch 2 of an accumulation: gradients already allocated) under
  FakeTensorMode on the CPU with CPU bf16 autocast, tracking live tensor storage bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from rfsr_ray.config import RFSRConfig
from rfsr_ray.config.load import load_config
from rfsr_ray.losses.gram import GramRegulariser
from rfsr_ray.losses.imagereward import ImageRewardModel, text_config, vision_config
from rfsr_ray.losses.structure import StructureLoss
from rfsr_ray.models.diffusion import checked_timesteps
from rfsr_ray.models.tiny import build_tiny
from rfsr_ray.schedule import resolve_windows

# Run as a script (`python benchmarks/flops.py`) or imported as `benchmarks.flops` (tests):
# either way its sibling module is importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from latent_step import real_model

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {
    "sd_upscaler": ROOT / "configs/finetune/sd_upscaler_rfsr.yaml",
    "controlnet_sr": ROOT / "configs/finetune/controlnet_sr_rfsr.yaml",
}
PEAK_TFLOPS = {"H100 (989 TFLOP/s)": 989.0, "A100 (312 TFLOP/s)": 312.0}  # dense bf16
RANKS = (1, 2, 4, 8)
GIB = 2**30
IMAGEREWARD_TOKENS = 35  # rfsr_ray.losses.imagereward.MAX_PROMPT_TOKENS
# OpenAI CLIP RN50: the arguments pyiqa's clip_model.build_model reads off its weights.
CLIP_RN50 = {
    "embed_dim": 1024,
    "image_resolution": 224,
    "vision_layers": (3, 4, 6, 3),
    "vision_width": 64,
    "vision_patch_size": None,
    "context_length": 77,
    "vocab_size": 49408,
    "transformer_width": 512,
    "transformer_heads": 8,
    "transformer_layers": 12,
}


# ---------------------------------------------------------------------------------- meters
Region = Callable[[], contextlib.AbstractContextManager]


class FlopMeter:
    """`region()` counts the FLOPs of what runs inside it."""

    def __init__(self) -> None:
        self.flops = 0

    @contextlib.contextmanager
    def region(self) -> Iterator[None]:
        with FlopCounterMode(display=False) as counter:
            yield
        self.flops += counter.get_total_flops()


class TimeMeter:
    """`region()` adds the wall time of what runs inside it (device-synchronised)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def region(self) -> Iterator[None]:
        self._sync()
        started = time.perf_counter()
        yield
        self._sync()
        self.seconds += time.perf_counter() - started


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and still alive (views and
    in-place results share a storage and count once; autograd's saved tensors keep theirs
    alive). Works on fake and meta tensors: storages keep one Python object while alive, so a
    weak reference to it fires when the storage is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.current += self.live[key]
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


# ---------------------------------------------------------------------------------- index model
def index_probabilities(cfg: RFSRConfig) -> np.ndarray:
    """(N,) probability of each sampler index, as training draws it."""
    return resolve_windows(cfg).probabilities


def expected_max(values: np.ndarray, probabilities: np.ndarray, ranks: int) -> float:
    """E[max of `ranks` i.i.d. draws of `values` with `probabilities`] (exact)."""
    order = np.argsort(values, kind="stable")
    sorted_values = np.asarray(values, dtype=float)[order]
    cdf = np.cumsum(np.asarray(probabilities)[order])
    below = np.concatenate([[0.0], cdf[:-1]])
    return float(np.sum(sorted_values * (np.clip(cdf, 0, 1) ** ranks - below**ranks)))


def sum_distribution(
    values: np.ndarray, probabilities: np.ndarray, draws: int
) -> tuple[np.ndarray, np.ndarray]:
    """Values and probabilities of the sum of `draws` i.i.d. draws (gradient accumulation)."""
    table = {0.0: 1.0}
    for _ in range(draws):
        nxt: dict[float, float] = {}
        for total, p_total in table.items():
            for value, p in zip(values, probabilities, strict=True):
                if p > 0:
                    key = round(total + float(value), 6)
                    nxt[key] = nxt.get(key, 0.0) + p_total * p
        table = nxt
    keys = np.array(sorted(table))
    return keys, np.array([table[k] for k in keys])


# ---------------------------------------------------------------------------------- step parts
@dataclass(frozen=True)
class Part:
    """One piece of a micro-batch. `run(region)` does the piece once, with only the part to
    account for inside `region()`; `active(i)` is how many times it runs at index i."""

    name: str
    run: Callable[[Region], None]
    active: Callable[[int], float]


def always(index: int) -> float:
    return 1.0


def rollout_calls(index: int) -> float:
    return float(index)  # trajectory mode: one sampler call per timestep before index i


def in_window(windows: dict[str, tuple[int, int]], name: str) -> Callable[[int], float]:
    low, high = windows.get(name, (1, 0))
    return lambda index: float(low <= index <= high)


def backward_part(forward: Callable[[], torch.Tensor]) -> Callable[[Region], None]:
    def run(region: Region) -> None:
        out = forward()
        with region():
            out.float().sum().backward()

    return run


def forward_backward_part(forward: Callable[[], torch.Tensor]) -> Callable[[Region], None]:
    def run(region: Region) -> None:
        with region():
            forward().float().sum().backward()

    return run


def forward_part(forward: Callable[[], object], grad: bool = True) -> Callable[[Region], None]:
    def run(region: Region) -> None:
        with region(), torch.set_grad_enabled(grad):
            forward()

    return run


def clip_iqa(device: torch.device) -> nn.Module:
    """pyiqa's CLIP-IQA network (`clipiqa`: RN50, no positional embedding, so it runs at the
    image's own size: pyiqa does not resize). Its `clip_model.load` downloads the weights, so the
    same CLIP class is built from the RN50 arguments instead."""
    from pyiqa.archs import clipiqa_arch
    from pyiqa.archs.clip_model import CLIP

    with torch.device(device):
        clip = CLIP(**CLIP_RN50).requires_grad_(False).eval()
    with mock.patch.object(clipiqa_arch, "load", return_value=clip):
        metric = clipiqa_arch.CLIPIQA(model_type="clipiqa", backbone="RN50")
    return metric.to(device).eval()


def image_reward(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The project's ImageReward network (BLIP ViT-L/16 at 224 px + med BERT), fed token ids
    as `ImageReward.forward` would (its tokenizer needs the hub). Its masks are all ones (no
    padding in the FLOP count, and the image tokens), which transformers recognises with a
    .all() that meta tensors refuse: the check is answered as it would be, True."""
    with torch.device(device):
        model = ImageRewardModel(vision_config(), text_config()).requires_grad_(False).eval()
        ids = torch.ones(1, IMAGEREWARD_TOKENS, dtype=torch.long)
    full_masks = mock.patch(
        "transformers.masking_utils._ignore_bidirectional_mask_sdpa", return_value=True
    )

    def score(image: torch.Tensor) -> torch.Tensor:
        with full_masks:
            ones = ids.expand(len(image), -1)
            return model(image, ones, ones)

    return score


def loss_parts(
    cfg: RFSRConfig,
    hr: torch.Tensor,
    rewards: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
    structure: nn.Module,
    gram: nn.Module,
) -> list[Part]:
    """The loss networks on the decoded image, in fp32 as `RFSRLosses` runs them."""
    windows = resolve_windows(cfg).windows
    reward_window = in_window(windows, "reward")

    def image() -> torch.Tensor:
        return torch.rand_like(hr).requires_grad_(True)

    parts = [
        Part("structure (DT-CWT) fwd+bwd", forward_backward_part(lambda: structure(image(), hr)),
             in_window(windows, "structure")),
        Part("Gram VGG19 fwd+bwd (x̂) + fwd (ref)", forward_backward_part(lambda: gram(image(), hr)),
             in_window(windows, "gram")),
    ]  # fmt: skip
    for name, reward in rewards.items():
        score = lambda r=reward: r(image(), hr)  # noqa: E731
        parts.append(Part(f"{name} fwd", forward_part(score), reward_window))
        parts.append(Part(f"{name} bwd", backward_part(score), reward_window))
    return parts


def model_parts(
    model: nn.Module,
    cfg: RFSRConfig,
    lr: torch.Tensor,
    autocast: Region,
    latent_family: bool,
    crop_latent: int | None = None,
) -> list[Part]:
    """Condition/x_T, the rollout, the gradient model call, the decode and the reference;
    `crop_latent`: decode only a window of this many latent pixels (`losses.decode_crop`)."""
    window = (..., slice(0, crop_latent), slice(0, crop_latent))  # the whole latent when None
    model.train()
    windows = resolve_windows(cfg).windows
    timesteps = checked_timesteps(model.scheduler, cfg.schedule.num_inference_steps, "cpu")
    device = lr.device
    with torch.no_grad(), torch.device(device):
        condition = model.condition(lr, None, None, mode="train")
        latent = model.start_latent(condition, None)
    # Mid-schedule timestep, 1-element on the model's device (a 0-d CPU one would be read
    # with .item(), which meta tensors refuse); FLOPs do not depend on which timestep.
    step_t, grad_t = timesteps[0], timesteps[len(timesteps) // 2].reshape(1).to(device)

    def sampler_call() -> None:
        with autocast():
            model.sampler_step(latent, step_t, condition, None)

    def predict() -> torch.Tensor:
        with autocast():
            return model.predict_x0(latent, grad_t, condition)

    def decode() -> torch.Tensor:
        with autocast():
            return model.decode(latent[window].detach().clone().requires_grad_(True))

    def reference() -> None:
        with autocast():
            model.decode(model.predict_x0(latent, grad_t, condition, reference=True)[window])

    def start() -> None:
        model.start_latent(condition, None)

    parts = [
        Part("x_T (controlnet_sr: VAE encode)", forward_part(start, grad=False), always),
        Part("rollout, per sampler call", forward_part(sampler_call, grad=False), rollout_calls),
        Part("model forward (grad)", forward_part(predict), always),
        Part("model backward", backward_part(predict), always),
        Part("reference model + decode (no grad)", forward_part(reference, grad=False),
             in_window(windows, "gram")),
    ]  # fmt: skip
    if latent_family:
        parts[4:4] = [
            Part("VAE decode forward", forward_part(decode), always),
            Part("VAE decode backward", backward_part(decode), always),
        ]
    return parts


def count(parts: Sequence[Part]) -> dict[str, float]:
    """FLOPs of one run of each part."""
    flops = {}
    for part in parts:
        meter = FlopMeter()
        part.run(meter.region)
        flops[part.name] = float(meter.flops)
    return flops


def set_checkpointing(model: nn.Module, enabled: bool) -> None:
    for name in ("unet", "controlnet", "vae"):
        module = getattr(model, name, None)
        if module is not None:
            if enabled:
                module.enable_gradient_checkpointing()
            else:
                module.disable_gradient_checkpointing()


# ---------------------------------------------------------------------------------- building
def build_latent(family: str, cfg: RFSRConfig, device: torch.device) -> nn.Module:
    """`real_model` on `device` with the recipe's model config; schedulers stay on the CPU (the
    project reads timesteps back with .cpu(), which meta tensors refuse)."""
    with torch.device(device):
        model = real_model(family, cfg)
    model.scheduler = type(model.scheduler).from_config(model.scheduler.config)
    if hasattr(model, "low_res_scheduler"):
        low_res = model.low_res_scheduler
        model.low_res_scheduler = type(low_res).from_config(low_res.config)
    return model


# ---------------------------------------------------------------------------------- report
@dataclass
class FamilyCost:
    family: str
    flops: dict[str, float]  # per run of each part
    active: dict[str, Callable[[int], float]]
    probabilities: np.ndarray
    recompute: float  # FLOPs of checkpoint recomputation inside the backward parts
    grad_accum: int

    def per_index(self, mode: str) -> np.ndarray:
        """(N,) FLOPs of a micro-batch at each index."""
        names = [n for n in self.flops if mode == "trajectory" or not n.startswith("rollout")]
        steps = range(len(self.probabilities))
        return np.array([sum(self.flops[n] * self.active[n](i) for n in names) for i in steps])

    def expected(self, name: str) -> float:
        calls = sum(p * self.active[name](i) for i, p in enumerate(self.probabilities))
        return self.flops[name] * calls


def cost_table(cost: FamilyCost) -> list[str]:
    lines = [f"\n### {cost.family}: GFLOPs per micro-batch (batch 1)\n"]
    lines.append(
        "| part | GFLOPs per run | runs per micro-batch | trajectory share | one-step share |"
    )
    lines.append("|---|---|---|---|---|")
    totals = {m: float(cost.per_index(m) @ cost.probabilities) for m in ("trajectory", "one_step")}
    for name, flops in cost.flops.items():
        expected = cost.expected(name)
        runs = expected / flops if flops else 0.0
        one_step = 0.0 if name.startswith("rollout") else expected / totals["one_step"]
        lines.append(
            f"| {name} | {flops / 1e9:,.1f} | {runs:.2f} | {expected / totals['trajectory']:.1%} "
            f"| {one_step:.1%} |"
        )
    lines.append(
        f"| **expected total** | | | {totals['trajectory'] / 1e9:,.0f} GFLOPs "
        f"| {totals['one_step'] / 1e9:,.0f} GFLOPs |"
    )
    lines.append(
        f"\nCheckpoint recomputation inside the backward parts: {cost.recompute / 1e9:,.0f} GFLOPs."
    )
    return lines


def crop_table(costs: dict[str, FamilyCost], crop: int) -> list[str]:
    """Expected GFLOPs per micro-batch without and with `losses.decode_crop`, and the ratio."""
    lines = [f"\n### losses.decode_crop={crop}: expected GFLOPs per micro-batch, 512² HR\n"]
    lines += ["| family | mode | whole image | decode_crop | speed-up (FLOPs) |", "|---" * 5 + "|"]
    for family, whole in costs.items():
        cropped = family_cost(family, decode_crop=crop)
        for mode in ("trajectory", "one_step"):
            before = float(whole.per_index(mode) @ whole.probabilities)
            after = float(cropped.per_index(mode) @ cropped.probabilities)
            lines.append(
                f"| {family} | {mode} | {before / 1e9:,.0f} | {after / 1e9:,.0f} "
                f"| {before / after:.2f}× |"
            )
    return lines


def floor_table(cost: FamilyCost) -> list[str]:
    """Floor (FLOPs / peak) per micro-batch and per optimiser step under DDP."""
    p, accum = cost.probabilities, cost.grad_accum
    indices = np.arange(len(p), dtype=float)
    lines = [f"\n### {cost.family}: floor at peak dense bf16, DDP, grad_accum {accum}\n"]
    head = "| mode | ranks R | E[max i] | micro-batch GFLOPs (E max over ranks) |"
    head += "".join(f" {gpu} ms/step |" for gpu in PEAK_TFLOPS)
    lines += [head, "|---" * (4 + len(PEAK_TFLOPS)) + "|"]
    for mode in ("trajectory", "one_step"):
        per_index = cost.per_index(mode)
        sums, p_sums = sum_distribution(per_index, p, accum)
        for ranks in RANKS:
            step = expected_max(sums, p_sums, ranks)
            row = f"| {mode} | {ranks} | {expected_max(indices, p, ranks):.2f} "
            row += f"| {expected_max(per_index, p, ranks) / 1e9:,.0f} |"
            row += "".join(f" {step / (peak * 1e12) * 1e3:,.0f} |" for peak in PEAK_TFLOPS.values())
            lines.append(row)
    return lines


VAE_FACTOR = {"sd_upscaler": 4, "controlnet_sr": 8}  # HR pixels per latent pixel


def family_cost(family: str, hr_size: int = 512, decode_crop: int | None = None) -> FamilyCost:
    """Counts on the meta device for a released architecture with its reference recipe;
    `decode_crop` (HR pixels): the decode, the reference decode and the losses see a window of
    that side, as `losses.decode_crop` makes them."""
    cfg = load_config(RECIPES[family])
    meta = torch.device("meta")
    model = build_latent(family, cfg, meta)
    lr = torch.rand(1, 3, hr_size // cfg.data.scale, hr_size // cfg.data.scale, device=meta)
    side = decode_crop or hr_size
    hr = torch.rand(1, 3, side, side, device=meta)
    crop_latent = decode_crop // VAE_FACTOR[family] if decode_crop else None
    parts = model_parts(model, cfg, lr, contextlib.nullcontext, True, crop_latent)
    with meta:
        structure = StructureLoss(cfg.losses.structure)
        gram = GramRegulariser(cfg.losses.gram.model_copy(update={"allow_random_vgg": True}))
    parts += loss_parts(cfg, hr, latent_rewards(meta), structure, gram)
    flops = count(parts)
    if family == "sd_upscaler":
        flops.pop(parts[0].name)  # x_T is plain noise for the upscaler
    backward = [p for p in parts if p.name.endswith("backward")]
    set_checkpointing(model, False)
    recompute = sum(flops[p.name] for p in backward) - sum(count(backward).values())
    set_checkpointing(model, cfg.model.memory.gradient_checkpointing)
    active = {p.name: p.active for p in parts}
    return FamilyCost(
        family, flops, active, index_probabilities(cfg), recompute, cfg.train.grad_accum
    )


def latent_rewards(
    device: torch.device,
) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The reference recipe's rewards, (sr, hr) → score (both are no-reference)."""
    clip, blip = clip_iqa(device), image_reward(device)
    return {"CLIP-IQA RN50": lambda sr, hr: clip(sr), "ImageReward BLIP": lambda sr, hr: blip(sr)}


# ---------------------------------------------------------------------------------- tiny, timed
def demo_setup(device: torch.device) -> tuple[nn.Module, RFSRConfig, list[Part]]:
    """The demo's tiny model (architecture of its pretrain config, random weights), its losses
    (RFSRLosses from configs/demo.yaml: weight-free rewards, random VGG) and its parts."""
    from rfsr_ray.losses.rfsr import RFSRLosses

    cfg = load_config(ROOT / "configs/demo.yaml")
    base = load_config(ROOT / cfg.model.pretrain_config)
    torch.manual_seed(0)
    model = build_tiny(base.model.model_copy(update={"pretrained": None}), cfg.data.scale)
    model.to(device)
    losses = RFSRLosses(cfg, device)
    hr_size = cfg.data.patch_size
    generator = torch.Generator().manual_seed(0)
    hr = torch.rand(cfg.train.batch_size, 3, hr_size, hr_size, generator=generator).to(device)
    lr = torch.nn.functional.interpolate(hr, scale_factor=1 / cfg.data.scale, mode="area")
    rewards = {
        f"reward {t.cfg.name}": lambda sr, hr, r=t.reward: r(sr, hr=hr) for t in losses.rewards
    }
    structure = losses.structure or nn.Identity()
    gram = losses.gram or nn.Identity()
    parts = model_parts(model, cfg, lr, contextlib.nullcontext, latent_family=False)
    parts += loss_parts(cfg, hr, rewards, structure, gram)
    return model, cfg, parts


def median_seconds(part: Part, device: torch.device, repeats: int) -> float:
    part.run(TimeMeter(device).region)  # warm-up
    times = []
    for _ in range(repeats):
        meter = TimeMeter(device)
        part.run(meter.region)
        times.append(meter.seconds)
    return statistics.median(times)


def measure_table(
    parts: Sequence[Part], device: torch.device, repeats: int, title: str
) -> list[str]:
    flops = count(parts)
    seconds = {p.name: median_seconds(p, device, repeats) for p in parts}
    total_f, total_s = sum(flops.values()), sum(seconds.values())
    lines = [
        f"\n### {title}\n",
        "| part | GFLOPs | ms (median) | GFLOP/s | FLOP share | time share |",
    ]
    lines.append("|---|---|---|---|---|---|")
    for part in parts:
        f, s = flops[part.name], seconds[part.name]
        rate = f / s / 1e9 if s > 0 else math.nan
        lines.append(
            f"| {part.name} | {f / 1e9:.4f} | {s * 1e3:.2f} | {rate:.1f} "
            f"| {f / total_f:.1%} | {s / total_s:.1%} |"
        )
    return lines


def measure_latent(family: str, device: torch.device, repeats: int) -> list[str]:
    """GPU check: the released architectures at 512² in bf16 autocast, random weights."""
    cfg = load_config(RECIPES[family])
    model = build_latent(family, cfg, device)
    hr = torch.rand(1, 3, cfg.data.patch_size, cfg.data.patch_size, device=device)
    lr = torch.nn.functional.interpolate(hr, scale_factor=1 / cfg.data.scale, mode="area")
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    parts = model_parts(model, cfg, lr, autocast, latent_family=True)
    with device:
        structure = StructureLoss(cfg.losses.structure)
        gram = GramRegulariser(cfg.losses.gram.model_copy(update={"allow_random_vgg": True}))
    parts += loss_parts(cfg, hr, latent_rewards(device), structure, gram)
    lines = measure_table(
        parts, device, repeats, f"{family} measured on {device} (bf16 model, fp32 losses)"
    )
    peak = max(PEAK_TFLOPS.values()) * 1e12
    lines.append(
        f"\nFloor per part = GFLOPs / {peak / 1e12:.0f} TFLOP/s; compare with the ms column."
    )
    return lines


# ---------------------------------------------------------------------------------- memory
class RecipeLosses(nn.Module):
    """`RFSRLosses`' call contract over networks built without weights (rfsr_loss calls it)."""

    def __init__(
        self, cfg: RFSRConfig, rewards: dict[str, nn.Module], device: torch.device
    ) -> None:
        super().__init__()
        self.windows = resolve_windows(cfg)
        self.needs_reference = True
        with device:
            self.structure = StructureLoss(cfg.losses.structure)
            self.gram = GramRegulariser(
                cfg.losses.gram.model_copy(update={"allow_random_vgg": True})
            )
        self.rewards = rewards

    def forward(
        self,
        index: int,
        sr_image: torch.Tensor,
        hr_image: torch.Tensor,
        lr_image: torch.Tensor | None = None,
        reference_image: torch.Tensor | None = None,
        prompts: list[str] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        active, sr_image = self.windows.active(index), sr_image.float()
        total = sr_image.new_zeros(())
        if "structure" in active:
            total = total + self.structure(sr_image, hr_image.float())
        if "reward" in active:
            for reward in self.rewards.values():
                total = total + reward(sr_image).float().mean()
        if "gram" in active:
            total = total + self.gram(sr_image, reference_image.float())
        return total, {}


def static_bytes(model: nn.Module, losses: RecipeLosses, clip: nn.Module) -> dict[str, float]:
    """Exact byte counts of what lives across steps (fp32 everywhere, as the project keeps it)."""
    trained = sum(p.numel() for p in model.trainable_parameters())
    reference = sum(b.numel() for b in model.reference.buffers())
    text = sum(p.numel() for p in model.text_encoder.parameters())
    weights = sum(t.numel() for t in [*model.parameters(), *model.buffers()]) - reference
    nets = sum(t.numel() for t in [*losses.parameters(), *losses.buffers(), *clip.parameters()])
    return {
        "trained parameters (count)": trained,
        "model weights (fp32, incl. text encoder)": 4 * weights,
        "  of which text encoder": 4 * text,
        "loss networks (CLIP RN50, BLIP, VGG19, DT-CWT)": 4 * nets,
        "frozen reference copy of the trained tensors": 4 * reference,
        "gradients": 4 * trained,
        "AdamW moments": 8 * trained,
        "EMA shadow": 4 * trained,
    }


def activation_peak(family: str, index: int) -> tuple[float, dict[str, float]]:
    """(peak bytes of the micro-batch's live tensors, static bytes), the gradient step at
    `index` run by the project's `rfsr_loss` (one-step latent: the rollout's no-grad
    activations are transient) under FakeTensorMode, CPU bf16 autocast."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from rfsr_ray.train.step import Batch, rfsr_loss

    cfg = load_config(RECIPES[family], ["schedule.mode=one_step"])
    meta = torch.device("meta")
    model = build_latent(family, cfg, meta)
    clip = clip_iqa(meta)
    blip = ImageRewardModel(vision_config(), text_config()).to(meta).requires_grad_(False)
    ids = torch.ones(1, IMAGEREWARD_TOKENS, dtype=torch.long)
    rewards = {"clip": clip, "blip": lambda image: blip(image, ids, ids)}
    losses = RecipeLosses(cfg, {}, meta)
    static = static_bytes(model, losses, clip.clip_model[0])
    static["loss networks (CLIP RN50, BLIP, VGG19, DT-CWT)"] += 4 * sum(
        p.numel() for p in blip.parameters()
    )
    # Timesteps are read back to the CPU (.tolist()), which fake tensors refuse: take them
    # before faking and hand them to rfsr_loss as the model's own, one (1,) row per index (a
    # 0-d timestep is read with .item() in alpha_bar, which fake tensors refuse too).
    timesteps = checked_timesteps(model.scheduler, cfg.schedule.num_inference_steps, "cpu")
    fixed = mock.patch.object(model, "set_timesteps", return_value=timesteps.reshape(-1, 1))
    with FakeTensorMode(allow_non_fake_inputs=True), fixed:
        for module in (model, losses, clip.clip_model[0], blip):
            module.to_empty(device="cpu")
        clip.to_empty(device="cpu")
        # CLIPIQA.forward moves its CLIP with .to(image), a no-op here that fake parameters
        # cannot go through (Module.to swaps tensor subclasses).
        clip.clip_model[0].to = lambda *args, **kwargs: clip.clip_model[0]
        losses.rewards = rewards
        for parameter in model.trainable_parameters():  # micro-batch 2: gradients exist
            parameter.grad = torch.zeros_like(parameter)
        size = cfg.data.patch_size
        hr = torch.rand(1, 3, size, size)
        batch = Batch(torch.rand(1, 3, size // cfg.data.scale, size // cfg.data.scale), hr)
        autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
        with LiveBytes() as live:
            output = rfsr_loss(model, losses, batch, index, cfg, None, autocast)
            output.loss.backward()
    return float(live.peak), static


def memory_table(family: str) -> list[str]:
    cfg = load_config(RECIPES[family])
    index = resolve_windows(cfg).windows["reward"][0]  # every network runs in this window
    peak, static = activation_peak(family, index)
    trained = static.pop("trained parameters (count)")
    title = (
        f"\n### {family}: peak GPU memory estimate, {cfg.data.patch_size}² bf16 autocast, "
        f"model.finetune={cfg.model.finetune_mode}, {trained / 1e6:,.0f} M trained parameters\n"
    )
    lines = [title, "| item | GiB |", "|---|---|"]
    for name, value in static.items():
        lines.append(f"| {name} | {value / GIB:.2f} |")
    lines.append(
        f"| step activations + gradient temporaries (measured, index {index}) | {peak / GIB:.2f} |"
    )
    total = sum(v for k, v in static.items() if not k.startswith("  ")) + peak
    lines.append(f"| **total** | **{total / GIB:.1f}** |")
    savings = {
        "train.optimizer=adamw_8bit": 6 * trained,
        "train.ema_on_cpu=true": 4 * trained,
        "model.memory.free_text_encoder=true": static["  of which text encoder"],
    }
    fits = "fits" if total < 80e9 else "does NOT fit"
    lines.append(f"\n{fits} in 80 GB as configured (80 GB = {80e9 / GIB:.1f} GiB).")
    for option, saved in savings.items():
        lines.append(f"- {option}: −{saved / GIB:.2f} GiB")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="time each part next to its FLOPs")
    parser.add_argument("--device", default="cpu", help="for --measure: cpu (tiny), cuda (real)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory estimate")
    parser.add_argument(
        "--decode-crop", type=int, default=256, help="losses.decode_crop to compare (HR px; 0: no)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    costs = {}
    for family in RECIPES:
        costs[family] = cost = family_cost(family)
        print("\n".join(cost_table(cost) + floor_table(cost)))
    if args.decode_crop:
        print("\n".join(crop_table(costs, args.decode_crop)))
    print(f"\n(counted in {time.perf_counter() - started:.1f} s)")
    if not args.no_memory:
        for family in RECIPES:
            print("\n".join(memory_table(family)))
        print(f"\n(with memory: {time.perf_counter() - started:.1f} s)")
    if args.measure:
        device = torch.device(args.device)
        if device.type == "cuda":
            for family in RECIPES:
                print("\n".join(measure_latent(family, device, args.repeats)))
        else:
            _, cfg, parts = demo_setup(device)
            title = (
                f"tiny family at the demo's size ({cfg.data.patch_size}² HR, batch "
                f"{cfg.train.batch_size}, {cfg.schedule.num_inference_steps} steps), CPU, 1 thread"
            )
            print("\n".join(measure_table(parts, device, args.repeats, title)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
