"""One RFSR (or denoising) optimisation step, independent of Ray.

`rfsr_loss` is METHOD.md section 2: reach the latent at the sampled index (trajectory or one-step
mode), then `gradient_step`: predict x̂0 with gradient, decode (optionally a `decode_window`),
and apply the losses active at that index. `TrajectoryBuffer` serves that gradient step from a
stored rollout (trajectory_buffer mode). `optimizer_step` wraps micro-batches, accumulation,
clipping, the non-finite guard and EMA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from rfsr_ray import seeds
from rfsr_ray.config import RFSRConfig, TrainConfig, TrajectoryBufferConfig
from rfsr_ray.errors import ConfigError, TrainingError
from rfsr_ray.losses.rfsr import RFSRLosses
from rfsr_ray.models.diffusion import run_sampler
from rfsr_ray.models.protocol import ISRDiffusionModel

Autocast = Callable[[], contextlib.AbstractContextManager]
NoSync = Callable[[], contextlib.AbstractContextManager]  # DDP's no_sync over every wrapper


@dataclass(frozen=True)
class Batch:
    """lr_image (B, 3, h, w) and hr_image (B, 3, h·s, w·s), float in [0, 1]; per-sample
    prompts when the data carries a caption column; the tagger stage's image embeddings
    (B, N, C) when it ran (seesr)."""

    lr_image: torch.Tensor
    hr_image: torch.Tensor
    prompts: list[str] | None = None
    image_embeds: torch.Tensor | None = None

    def condition(
        self, model: ISRDiffusionModel, generator: torch.Generator | None, mode: str = "train"
    ) -> object:
        """The model's condition of this batch; the image embeddings go along when present."""
        extra = {} if self.image_embeds is None else {"image_embeds": self.image_embeds}
        return model.condition(self.lr_image, generator, self.prompts, mode=mode, **extra)


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar with gradient
    terms: dict[str, torch.Tensor]  # detached per-term values
    index: int | None  # sampler index used (None for the denoising loss)


def autocast_for(precision: str, device: torch.device) -> Autocast:
    """A context factory: autocast in fp16/bf16 for the model, or nothing for `no`."""
    if precision == "no":
        return contextlib.nullcontext
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def latent_at_index(
    model: ISRDiffusionModel,
    condition: object,
    timesteps: torch.Tensor,
    index: int,
    mode: str,
    generator: torch.Generator | None,
    autocast: Autocast = contextlib.nullcontext,
) -> torch.Tensor:
    """x_t at sampler index `index`: the real sampler run without gradient from x_T (trajectory
    mode, ReFL) or x_T itself whatever the index (one_step mode, the reference code's)."""
    latent = model.start_latent(condition, generator)
    if mode != "one_step":  # trajectory (and trajectory_buffer, which rolls out the same way)
        step = functools.partial(model.sampler_step, condition=condition, generator=generator)
        with torch.no_grad(), autocast():
            latent = run_sampler(step, latent, timesteps[:index])
    return latent


def rfsr_loss(
    model: ISRDiffusionModel,
    losses: RFSRLosses,
    batch: Batch,
    index: int,
    cfg: RFSRConfig,
    generator: torch.Generator | None,
    autocast: Autocast = contextlib.nullcontext,
) -> StepOutput:
    """RFSR loss at sampler index `index` (0 = noisiest)."""
    condition = batch.condition(model, generator)
    timesteps = model.set_timesteps(cfg.schedule.num_inference_steps)
    latent = latent_at_index(
        model, condition, timesteps, index, cfg.schedule.mode, generator, autocast
    )
    return gradient_step(model, losses, batch, condition, latent, index, cfg, generator, autocast)


def gradient_step(
    model: ISRDiffusionModel,
    losses: RFSRLosses,
    batch: Batch,
    condition: object,
    latent: torch.Tensor,
    index: int,
    cfg: RFSRConfig,
    generator: torch.Generator | None,
    autocast: Autocast = contextlib.nullcontext,
) -> StepOutput:
    """From x_t at sampler index `index` (`latent`): predict x̂0 with gradient, decode (a
    `losses.decode_crop` window of it), and apply the losses active at `index`."""
    timestep = model.set_timesteps(cfg.schedule.num_inference_steps)[index]
    hr_image, lr_image = batch.hr_image, batch.lr_image
    with autocast():
        x0 = model.predict_x0(latent, timestep, condition)
    window = None
    if cfg.losses.decode_crop is not None:
        window = decode_window(x0, hr_image, lr_image, cfg.losses.decode_crop, generator)
        x0, hr_image, lr_image = window.latent(x0), window.hr(hr_image), window.lr(lr_image)
    with autocast():
        sr_image = model.decode(x0)
    reference = None
    if losses.needs_reference and "gram" in losses.windows.active(index):
        with torch.no_grad(), autocast():
            x0_reference = model.predict_x0(latent, timestep, condition, reference=True)
            reference = model.decode(window.latent(x0_reference) if window else x0_reference)
    total, terms = losses(index, sr_image, hr_image, lr_image, reference, batch.prompts)
    return StepOutput(total, terms, index)


@dataclass(frozen=True)
class DecodeWindow:
    """One square window in the three resolutions of a step: latent, HR and LR (top, left and
    side in each's own pixels)."""

    top: int  # in latent pixels
    left: int
    side: int
    hr_per_latent: int
    scale: int  # HR pixels per LR pixel

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., self.top : self.top + self.side, self.left : self.left + self.side]

    def hr(self, x: torch.Tensor) -> torch.Tensor:
        f = self.hr_per_latent
        return x[
            ...,
            self.top * f : (self.top + self.side) * f,
            self.left * f : (self.left + self.side) * f,
        ]

    def lr(self, x: torch.Tensor) -> torch.Tensor:
        f, s = self.hr_per_latent, self.scale
        top, left, side = self.top * f // s, self.left * f // s, self.side * f // s
        return x[..., top : top + side, left : left + side]


def decode_window(
    x0: torch.Tensor,
    hr_image: torch.Tensor,
    lr_image: torch.Tensor,
    crop: int,
    generator: torch.Generator | None,
) -> DecodeWindow:
    """A random window of `crop` HR pixels (`losses.decode_crop`) aligned so that it is whole in
    the latent (x̂0 before decoding), the HR and the LR image; drawn from `generator`.

    The latent-to-HR factor is read from the shapes (1 for pixel-space families, the VAE's 4 or 8
    for latent ones), so no family has to declare it.
    """
    hr_per_latent = hr_image.shape[-1] // x0.shape[-1]
    scale = hr_image.shape[-1] // lr_image.shape[-1]
    unit = math.lcm(hr_per_latent, scale)  # HR pixels: window edges on whole latent and LR pixels
    if crop % unit:
        raise ConfigError(
            f"losses.decode_crop={crop} must be a multiple of {unit} HR pixels for this model "
            f"(one latent pixel is {hr_per_latent} HR pixels, one LR pixel {scale}); "
            f"e.g. {max(unit, crop - crop % unit)}"
        )
    height, width = hr_image.shape[-2:]
    positions = [(size - crop) // unit + 1 for size in (height, width)]
    device = generator.device if generator is not None else torch.device("cpu")
    top, left = (
        int(torch.randint(count, (1,), generator=generator, device=device)) * unit // hr_per_latent
        for count in positions
    )
    return DecodeWindow(top, left, crop // hr_per_latent, hr_per_latent, scale)


def denoise_loss(
    model: ISRDiffusionModel,
    batch: Batch,
    generator: torch.Generator | None,
    autocast: Autocast = contextlib.nullcontext,
) -> StepOutput:
    with autocast():
        loss = model.denoise_loss(batch.hr_image, batch.lr_image, generator)
    loss = loss.float()
    return StepOutput(loss, {"loss_denoise": loss.detach()}, None)


def build_optimizer(
    parameters: Sequence[torch.nn.Parameter], cfg: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (`train.optimizer`: torch's, or bitsandbytes' 8-bit / paged 8-bit) plus the LR
    schedule (constant or cosine, both with linear warm-up)."""
    optimizer = optimizer_class(cfg.optimizer)(
        parameters, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    name = "constant_with_warmup" if cfg.lr_schedule == "constant" else "cosine"
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps
    )
    return optimizer, scheduler


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """torch's AdamW, or bitsandbytes' AdamW with 8-bit state: its two moments are kept as
    uint8 with a float scale per 2048-value block (about 2 bytes per parameter instead of 8;
    tensors under 4096 values keep fp32 state). The paged variant also lets CUDA page that
    state out to CPU memory under pressure; on a CPU it runs as the plain 8-bit one."""
    if name == "adamw":
        return torch.optim.AdamW
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(
            f"train.optimizer={name} needs bitsandbytes, which is not installed; install it "
            "with `pip install -c constraints.txt bitsandbytes`, or set train.optimizer=adamw"
        ) from None
    classes = {
        "adamw_8bit": bitsandbytes.optim.AdamW8bit,
        "paged_adamw_8bit": bitsandbytes.optim.PagedAdamW8bit,
    }
    return classes[name]


class ConstantDecayEMA(EMAModel):
    """diffusers' EMAModel with the decay fixed at `decay` from the first update, as the
    reference trains (METHOD.md section 3). EMAModel itself ramps the decay (below)."""

    def get_decay(self, optimization_step: int) -> float:
        return self.decay


class CPUShadowEMA(EMAModel):
    """An EMA whose shadow weights stay in CPU memory whatever device the model is on
    (`train.ema_on_cpu`): 4 bytes per trained parameter less on the accelerator, for one
    device-to-CPU copy of the trained weights per update (one tensor at a time, so the extra
    CPU memory is one tensor). The update is EMAModel's, value for value."""

    def __init__(self, parameters: Sequence[torch.nn.Parameter], **kwargs: object) -> None:
        # EMAModel would clone every parameter where it is (the accelerator) first.
        super().__init__([], **kwargs)
        self.shadow_params = [p.detach().to("cpu", copy=True) for p in parameters]

    def to(self, device: object = None, dtype: object = None, non_blocking: bool = False) -> None:
        """Stays on the CPU (only `dtype` applies): `build_state` moves other EMAs."""
        super().to(device="cpu", dtype=dtype)

    @torch.no_grad()
    def step(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        for shadow, parameter in zip(self.shadow_params, parameters, strict=True):
            value = parameter.detach().to("cpu")
            if parameter.requires_grad:
                shadow.sub_((1 - decay) * (shadow - value))  # EMAModel.step's expression
            else:
                shadow.copy_(value)


class ConstantDecayCPUShadowEMA(CPUShadowEMA, ConstantDecayEMA):
    """The reference's constant decay with the shadow on the CPU."""


def build_ema(parameters: Sequence[torch.nn.Parameter], cfg: TrainConfig) -> EMAModel:
    """EMA of the trainable parameters, moving toward the trained weights each step:
    shadow ← d·shadow + (1−d)·param.

    `ema_schedule: constant`: d = ema_decay at every update (the reference's).
    `ema_schedule: ramp`: diffusers' default d = min(ema_decay, (1 + n)/(10 + n)) after n
    updates, a warm-up that reaches 0.991 at n = 1000 and 0.999 only after about 9000.
    `ema_on_cpu`: the shadow weights live in CPU memory (`CPUShadowEMA`).
    """
    if cfg.ema_schedule == "constant":
        kind = ConstantDecayCPUShadowEMA if cfg.ema_on_cpu else ConstantDecayEMA
        return kind(parameters, decay=cfg.ema_decay)
    kind = CPUShadowEMA if cfg.ema_on_cpu else EMAModel
    return kind(parameters, decay=cfg.ema_decay, min_decay=0.0, use_ema_warmup=False)


@dataclass
class Trajectory:
    """One micro-batch's rollout: its pairs, its condition and x_t at each loss-window index."""

    batch: Batch
    condition: object
    latents: dict[int, torch.Tensor]
    made_at: int  # the optimiser step that rolled it out


class TrajectoryBuffer:
    """`schedule.mode: trajectory_buffer`. At a refresh the worker rolls out the real sampler
    without gradient, batched, for the pairs of that optimiser step's micro-batches, keeping x_t
    at every index a loss window holds; the next `refresh_every` optimiser steps are served from
    it (micro-batch j from trajectory j, at a freshly drawn index), so one rollout feeds several
    gradient steps at several indices. Not checkpointed: a resumed run rolls out again."""

    def __init__(self, cfg: TrajectoryBufferConfig, indices: Sequence[int]) -> None:
        self.cfg = cfg
        self.indices = sorted(int(i) for i in indices)
        self.entries: list[Trajectory] = []
        self.mib = 0.0

    def stale(self, step: int) -> bool:
        """Whether optimiser step `step` must roll out afresh (empty, or `refresh_every` old)."""
        return not self.entries or step - self.entries[0].made_at >= self.cfg.refresh_every

    def batches(self) -> list[Batch]:
        """The pairs the buffer serves, one batch per micro-batch."""
        return [entry.batch for entry in self.entries]

    @torch.no_grad()
    def refill(
        self,
        model: ISRDiffusionModel,
        micro_batches: Sequence[Batch],
        cfg: RFSRConfig,
        generator: torch.Generator | None,
        step: int,
        autocast: Autocast = contextlib.nullcontext,
    ) -> None:
        """Roll out each micro-batch from x_T to the deepest window index; keep x_t at every
        window index. The draws from `generator` are trajectory mode's (condition, x_T, sampler
        steps), so with one index per trajectory the loss equals trajectory mode's."""
        timesteps = model.set_timesteps(cfg.schedule.num_inference_steps)
        wanted, deepest = set(self.indices), max(self.indices)
        entries = []
        for batch in micro_batches:
            condition = batch.condition(model, generator)
            latent = model.start_latent(condition, generator)
            kept = {}
            with autocast():
                for index in range(deepest + 1):
                    if index in wanted:
                        kept[index] = latent
                    if index < deepest:
                        latent = model.sampler_step(
                            latent, timesteps[index], condition=condition, generator=generator
                        )
            entries.append(Trajectory(batch, condition, kept, step))
        mib = sum(_tensor_bytes((e.batch, e.condition, e.latents)) for e in entries) / 2**20
        if mib > self.cfg.max_mib:
            raise ConfigError(
                f"the trajectory buffer needs {mib:.0f} MiB per worker ({len(entries)} "
                f"micro-batches × {len(wanted)} window indices of x_t, with pairs and conditions), "
                f"over schedule.buffer.max_mib={self.cfg.max_mib:g}; raise it, or lower "
                "train.grad_accum, train.batch_size or the number of window indices"
            )
        self.entries, self.mib = entries, mib


def _tensor_bytes(value: object) -> int:
    """Bytes of the tensors inside `value` (tensors, sequences, mappings, dataclasses)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(_tensor_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 0


@dataclass
class TrainState:
    model: ISRDiffusionModel
    losses: RFSRLosses | None
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EMAModel
    index_rng: np.random.Generator
    generator: torch.Generator
    scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling (CUDA only)
    step: int = 0  # optimiser step attempts, including skipped non-finite ones
    skipped_steps: int = 0
    nonfinite_streak: int = 0
    params: list[torch.nn.Parameter] = field(default_factory=list)
    buffer: TrajectoryBuffer | None = None  # schedule.mode=trajectory_buffer


@dataclass
class StepResult:
    terms: dict[str, float]
    indices: list[int]
    grad_norm: float
    skipped: bool
    lr: float


def optimizer_step(
    state: TrainState,
    micro_batches: Sequence[Batch],
    cfg: RFSRConfig,
    autocast: Autocast = contextlib.nullcontext,
    no_sync: NoSync = contextlib.nullcontext,
) -> StepResult:
    """Accumulate gradients over `micro_batches`, clip, then update weights, LR and EMA.

    A non-finite loss or gradient norm on any rank skips the update on every rank (so DDP replicas
    stay identical); `train.max_nonfinite_steps` consecutive skips raise `TrainingError`.
    """
    state.optimizer.zero_grad(set_to_none=True)
    if state.buffer is not None and state.buffer.stale(state.step):
        state.buffer.refill(state.model, micro_batches, cfg, state.generator, state.step, autocast)
    outputs = []
    for position, batch in enumerate(micro_batches):
        # Gradients are all-reduced once, on the last micro-batch. DDP decides in the *forward*
        # pass whether the following backward reduces, so every other micro-batch runs its
        # forward and its backward inside no_sync.
        last = position == len(micro_batches) - 1
        with contextlib.nullcontext() if last else no_sync():
            output = _forward(state, batch, cfg, autocast, position)
            _backward(state, output.loss / len(micro_batches))
        outputs.append(output)
    grad_norm = _clip_gradients(state, cfg)
    state.step += 1
    lr = state.optimizer.param_groups[0]["lr"]
    finite = np.isfinite(grad_norm) and all(torch.isfinite(o.loss).item() for o in outputs)
    skipped = any_rank(not finite)
    if skipped:
        _skip_update(state, cfg)
    else:
        _update(state)
    return StepResult(
        _mean_terms(outputs),
        [o.index for o in outputs if o.index is not None],
        grad_norm,
        skipped,
        lr,
    )


def _forward(
    state: TrainState, batch: Batch, cfg: RFSRConfig, autocast: Autocast, position: int = 0
) -> StepOutput:
    """The loss of one micro-batch (`train.loss`), at a freshly sampled index for RFSR; in
    trajectory_buffer mode from the buffer's trajectory `position` (which holds `batch`'s pairs),
    with its staleness and the buffer's size as terms."""
    if cfg.train.loss != "rfsr":
        return denoise_loss(state.model, batch, state.generator, autocast)
    assert state.losses is not None  # built for train.loss=rfsr
    index = state.losses.windows.sample(state.index_rng)
    if state.buffer is None:
        return rfsr_loss(state.model, state.losses, batch, index, cfg, state.generator, autocast)
    entry = state.buffer.entries[position]
    output = gradient_step(
        state.model,
        state.losses,
        entry.batch,
        entry.condition,
        entry.latents[index],
        index,
        cfg,
        state.generator,
        autocast,
    )
    output.terms["buffer_staleness"] = torch.tensor(float(state.step - entry.made_at))
    output.terms["buffer_mib"] = torch.tensor(state.buffer.mib)
    return output


def _backward(state: TrainState, loss: torch.Tensor) -> None:
    """Accumulate `loss`'s gradients, loss-scaled under fp16."""
    if state.scaler is not None:
        loss = state.scaler.scale(loss)
    loss.backward()


def _clip_gradients(state: TrainState, cfg: RFSRConfig) -> float:
    """Unscale (fp16) and clip the accumulated gradients to norm `train.grad_clip`; returns
    their norm before clipping (inf or nan when non-finite)."""
    if state.scaler is not None:
        state.scaler.unscale_(state.optimizer)
    return float(torch.nn.utils.clip_grad_norm_(state.params, cfg.train.grad_clip))


def _update(state: TrainState) -> None:
    """Weights, LR schedule and EMA take the step."""
    if state.scaler is not None:
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        state.optimizer.step()
    state.lr_scheduler.step()
    state.ema.step(state.params)
    state.nonfinite_streak = 0


def _skip_update(state: TrainState, cfg: RFSRConfig) -> None:
    """Drop a non-finite step's gradients; too many in a row end the run."""
    state.optimizer.zero_grad(set_to_none=True)
    state.skipped_steps += 1
    state.nonfinite_streak += 1
    if state.nonfinite_streak >= cfg.train.max_nonfinite_steps:
        raise TrainingError(
            f"{state.nonfinite_streak} consecutive optimiser steps had non-finite gradients "
            f"(step {state.step}); lower train.lr, use train.mixed_precision=bf16 or no, or "
            "check the data. The last good checkpoint is kept"
        )
    if state.scaler is not None:
        state.scaler.update()  # lowers the loss scale after an overflow


def any_rank(flag: bool) -> bool:
    """True when `flag` is true on any DDP rank (just `flag` outside torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    value = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item() > 0)


def _mean_terms(outputs: Sequence[StepOutput]) -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    for output in outputs:
        sums.setdefault("loss", []).append(float(output.loss.detach()))
        for name, value in output.terms.items():
            sums.setdefault(name, []).append(float(value))
    return {name: float(np.mean(values)) for name, values in sums.items()}


def build_state(
    cfg: RFSRConfig, model: ISRDiffusionModel, device: torch.device, rank: int = 0
) -> TrainState:
    """Losses, optimiser, LR schedule, EMA and seeded generators for `model`: the index stream
    shared by every rank, the noise per rank."""
    params = model.trainable_parameters()
    losses = RFSRLosses(cfg, device) if cfg.train.loss == "rfsr" else None
    optimizer, lr_scheduler = build_optimizer(params, cfg.train)
    ema = build_ema(params, cfg.train)
    ema.to(device)  # a CPUShadowEMA stays on the CPU
    # Every rank draws the same index for each micro-batch (one stream, no rank key), so no rank
    # waits for another's deeper rollout (E[max of 8 ranks' indices] would be 2.1x the mean);
    # noise stays per rank. (seed, rank) makes a run reproducible.
    index_rng = seeds.numpy_rng(cfg.train.seed, "index")
    generator = seeds.torch_generator(cfg.train.seed, "noise", rank, device=device)
    # fp16 needs loss scaling so small gradients do not underflow; bf16 and fp32 do not.
    scaler = None
    if cfg.train.mixed_precision == "fp16" and device.type == "cuda":
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    buffer = None
    if losses is not None and cfg.schedule.mode == "trajectory_buffer":
        indices = np.flatnonzero(losses.windows.probabilities)  # every index a window holds
        buffer = TrajectoryBuffer(cfg.schedule.buffer, indices)
    return TrainState(
        model,
        losses,
        optimizer,
        lr_scheduler,
        ema,
        index_rng,
        generator,
        scaler=scaler,
        params=params,
        buffer=buffer,
    )
