"""A conformance kit for `ISRDiffusionModel` adapters (diffusers' `ModelTesterMixin`, for RFSR).

Run it on a new model family before training it: each check exercises one part of the protocol
the way RFSR training uses it and fails with a `ConformanceError` that starts with the method that
broke (`predict_x0: ...`), says what was expected and names the likely fix.

    class TestMyModel(ISRModelConformance):  # pytest collects test_protocol, test_ddp, ...
        lr_size = 16

        def build_model(self) -> ISRDiffusionModel:
            torch.manual_seed(0)
            return build_my_model()

or, without pytest, `check_isr_model(ConformanceCase(build=build_my_model))`. The checks, in
`CHECKS` order: protocol (members and attributes), set_timesteps (N descending integer steps),
predict_x0 (the x̂0 sampler_step steps to under DDIM), decode (differentiable [0, 1] images; sample
too), reference (frozen original), gradients (finite on what trains, none on what does not),
determinism (seeded sampling), save_load (exports round-trip), ddp (training through DDP).

Besides the protocol itself the kit relies on three conventions every built-in family keeps:
`sampler_step` and `predict_x0` use `self.scheduler` (the predict_x0 check swaps a DDIM scheduler
in), all randomness comes from the `generator` arguments, and the trained forward passes run
through the wrappers of `wrap_trainable` (how DDP all-reduces gradients). Everything runs in
float32 on the CPU at tiny sizes.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import DDIMScheduler, SchedulerMixin
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rfsr_ray.config import StructureLossConfig
from rfsr_ray.losses.structure import StructureLoss
from rfsr_ray.models import load_model as load_export
from rfsr_ray.models.diffusion import alpha_bar, is_variance_preserving, timesteps_problem
from rfsr_ray.models.plugin import missing_members
from rfsr_ray.models.protocol import ISRDiffusionModel
from rfsr_ray.seeds import seed_globals

# Adam's first step moves every weight that has a gradient by about this much whatever the
# gradient's scale, so "the trained output changed" holds on any model, however its loss scales.
PERTURBATION_LR = 1e-2
# float32 round-off of x̂0 ↔ ε̂ grows with x̂0's magnitude (ε-models divide by √ᾱ_t).
RELATIVE_TOLERANCE = 1e-4

Point = tuple[Any, torch.Tensor, torch.Tensor]  # (condition, x_t, t): where x̂0 is predicted


class ConformanceError(AssertionError):
    """An adapter breaks the `ISRDiffusionModel` contract.

    `str(error)` starts with `method`, the protocol member that broke (`"predict_x0: ..."`).
    `check_isr_model` raises one error listing every failed check, one line each, and keeps them
    by check name in `failures`.
    """

    def __init__(self, method: str, problem: str) -> None:
        super().__init__(f"{method}: {problem}")
        self.method = method
        self.problem = problem
        self.failures: dict[str, ConformanceError] = {}


@dataclass(frozen=True)
class ConformanceCase:
    """What to check and at which sizes.

    `build` returns a fresh trainable model with the same weights on every call (seed it);
    `load` reloads what `save` wrote (defaults: `rfsr_ray.models.load_model`, `model.save`; a
    plug-in family reloads through load_model only when saved with
    `rfsr_ray.models.save_model(model, cfg, path)`, so pass that as `save`).
    Inputs are LR (batch_size, 3, lr_size, lr_size) in [0, 1] and their HR
    (batch_size, 3, lr_size·scale, lr_size·scale); `atol` bounds "equal" outputs.
    """

    build: Callable[[], ISRDiffusionModel]
    load: Callable[[Path], ISRDiffusionModel] | None = None
    save: Callable[[ISRDiffusionModel, Path], Path] | None = None
    lr_size: int = 8
    batch_size: int = 2
    num_inference_steps: int = 4
    seed: int = 0
    atol: float = 1e-5

    def __post_init__(self) -> None:
        if self.num_inference_steps < 2:
            raise ValueError(
                f"ConformanceCase.num_inference_steps={self.num_inference_steps}: the checks "
                "step into a trajectory and need at least 2; use 4"
            )
        if self.lr_size < 1 or self.batch_size < 1 or self.atol <= 0:
            raise ValueError(
                f"ConformanceCase lr_size={self.lr_size}, batch_size={self.batch_size}, "
                f"atol={self.atol}: all must be positive (defaults 8, 2, 1e-5)"
            )


# ------------------------------------------------------------------ shared pieces
@contextlib.contextmanager
def _calling(method: str) -> Iterator[None]:
    """Report an exception raised inside `method` as that method's `ConformanceError`."""
    try:
        yield
    except ConformanceError:
        raise
    except Exception as error:
        raise ConformanceError(
            method, f"raised {type(error).__name__}: {error} (traceback above)"
        ) from error


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _build(case: ConformanceCase) -> ISRDiffusionModel:
    """A fresh model, every global random source seeded first (the kit's own inputs are seeded
    generators; this covers a `build` that draws initial weights from torch's global RNG)."""
    seed_globals(case.seed, 0)
    with _calling("build"):
        return case.build()


def _images(case: ConformanceCase, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth HR batch (B, 3, L·scale, L·scale) in [0, 1] and its area-downsampled LR
    (B, 3, L, L), L = `case.lr_size`."""
    side = case.lr_size
    coarse = torch.rand(case.batch_size, 3, side, side, generator=_generator(case.seed))
    hr_image = F.interpolate(coarse, scale_factor=scale, mode="bicubic", align_corners=False)
    hr_image = hr_image.clamp(0, 1)
    return F.interpolate(hr_image, size=(side, side), mode="area"), hr_image


def _start(
    model: ISRDiffusionModel, case: ConformanceCase, mode: str, generator: torch.Generator
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """(condition, x_T, the N timesteps) for the case's LR batch, in `sample`'s order."""
    lr_image, _ = _images(case, model.scale)
    with _calling("condition"):
        condition = model.condition(lr_image, generator, mode=mode)
    with _calling("set_timesteps"):
        timesteps = model.set_timesteps(case.num_inference_steps)
    with _calling("start_latent"):
        latent = model.start_latent(condition, generator)
    return condition, latent, timesteps


def _noisy_point(model: ISRDiffusionModel, case: ConformanceCase, mode: str) -> Point:
    """(condition, x_t, t) one sampler step into a trajectory (sampler index 1): past x_T,
    where ᾱ ≈ 0 makes x̂0 ill-conditioned."""
    generator = _generator(case.seed)
    condition, latent, timesteps = _start(model, case, mode, generator)
    with _calling("sampler_step"):
        latent = model.sampler_step(latent, timesteps[0], condition, generator)
    return condition, latent, timesteps[1]


def _predict(model: ISRDiffusionModel, point: Point, reference: bool = False) -> torch.Tensor:
    """`model.predict_x0` at `point` = (condition, x_t, t), shape-checked against x_t."""
    condition, latent, timestep = point
    with _calling("predict_x0"):
        x0 = model.predict_x0(latent, timestep, condition, reference=reference)
    if not isinstance(x0, torch.Tensor) or x0.shape != latent.shape:
        shape = tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__
        raise ConformanceError(
            "predict_x0",
            f"returned {shape} for a latent of shape {tuple(latent.shape)}; expected x̂0 shaped "
            "like the latent (the model's prediction of the clean latent)",
        )
    return x0


def _require_grad(x0: torch.Tensor) -> None:
    if not x0.requires_grad:
        raise ConformanceError(
            "predict_x0",
            "the trained x̂0 (reference=False) does not require grad under torch.enable_grad(); "
            "expected it differentiable w.r.t. trainable_parameters() (RFSR backpropagates its "
            "losses through it): do not run the trained denoiser under torch.no_grad() or detach",
        )


def _max_diff(first: torch.Tensor, second: torch.Tensor) -> float:
    return float((first.detach().float() - second.detach().float()).abs().max())


def _tolerance(case: ConformanceCase, value: torch.Tensor) -> float:
    """How far two float32 computations of `value` may differ: atol plus round-off."""
    return case.atol + RELATIVE_TOLERANCE * float(value.detach().abs().max())


def _adam_step(model: ISRDiffusionModel, loss: torch.Tensor, method: str) -> None:
    """`loss.backward()` and one Adam step (lr `PERTURBATION_LR`) on trainable_parameters()."""
    parameters = _trainable(model)
    optimiser = torch.optim.Adam(parameters, lr=PERTURBATION_LR)
    with _calling(method):
        loss.backward()
    # Finite gradients keep the step meaningful; the gradients check owns the rest.
    problem = _gradient_problem(parameters, _parameter_names(model, parameters), require=False)
    if problem is not None:
        raise problem
    optimiser.step()
    optimiser.zero_grad(set_to_none=True)


def _perturb(model: ISRDiffusionModel, case: ConformanceCase) -> None:
    """One optimiser step against mean(x̂0²), so the model's weights are no longer its build's."""
    x0 = _predict(model, _noisy_point(model, case, "train"))
    _require_grad(x0)
    _adam_step(model, x0.float().square().mean(), "predict_x0")


def _check_image(method: str, image: object, case: ConformanceCase, scale: int) -> None:
    """`image` is a float (B, 3, L·scale, L·scale) tensor in [0, 1] (within atol)."""
    side = case.lr_size * scale
    expected = (case.batch_size, 3, side, side)
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        kind = image.dtype if isinstance(image, torch.Tensor) else type(image).__name__
        raise ConformanceError(method, f"returned {kind}; expected a float image tensor")
    if tuple(image.shape) != expected:
        raise ConformanceError(
            method,
            f"returned shape {tuple(image.shape)}; expected {expected} (B, 3, H, W) with "
            f"H = W = lr_size·scale = {case.lr_size}·{scale}: check `scale` and the upsampling",
        )
    low, high = float(image.detach().min()), float(image.detach().max())
    if not torch.isfinite(image).all() or low < -case.atol or high > 1 + case.atol:
        raise ConformanceError(
            method,
            f"values span [{low:.3g}, {high:.3g}]; expected finite images in [0, 1]: map the "
            "decoder's [-1, 1] with (x + 1) / 2 and clamp straight-through (TinySRModel.decode)",
        )


# ------------------------------------------------------------------ protocol
def check_protocol(case: ConformanceCase) -> None:
    """The model is an `ISRDiffusionModel`: every member present, `family` a non-empty str,
    `scale` an int >= 1, `scheduler` a variance-preserving diffusers scheduler (x_t =
    √ᾱ·x0 + √(1−ᾱ)·ε, the parameterisation every RFSR x̂0 assumes)."""
    model = _build(case)
    missing = missing_members(model)
    if missing or not isinstance(model, ISRDiffusionModel):
        raise ConformanceError(
            missing[0] if missing else "ISRDiffusionModel",
            f"{type(model).__name__} lacks the ISRDiffusionModel members {missing}; implement "
            "them (rfsr_ray/models/protocol.py; TrainableWrappers gives the wrap_trainable pair)",
        )
    family, scale, scheduler = model.family, model.scale, model.scheduler
    if not isinstance(family, str) or not family:
        raise ConformanceError("family", f"is {family!r}; expected a non-empty str, e.g. 'tiny'")
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise ConformanceError("scale", f"is {scale!r}; expected the SR factor, an int >= 1")
    if not isinstance(scheduler, SchedulerMixin) or not is_variance_preserving(scheduler):
        raise ConformanceError(
            "scheduler",
            f"is a {type(scheduler).__name__}; expected a variance-preserving diffusers "
            "scheduler with alphas_cumprod and init_noise_sigma 1 (DDIMScheduler, DDPMScheduler)",
        )


def check_set_timesteps(case: ConformanceCase) -> None:
    """`set_timesteps(N)` returns N distinct, strictly descending integer timesteps in
    [0, T-1] (RFSR addresses the schedule by sampler index 0..N-1) and configures
    `model.scheduler` with them, for N and 2N+1 steps."""
    model = _build(case)
    train_steps = model.scheduler.config.num_train_timesteps
    for steps in (case.num_inference_steps, 2 * case.num_inference_steps + 1):
        with _calling("set_timesteps"):
            timesteps = model.set_timesteps(steps)
        if not isinstance(timesteps, torch.Tensor):
            raise ConformanceError(
                "set_timesteps", f"returned {type(timesteps).__name__}; expected a (N,) tensor"
            )
        problem = timesteps_problem(timesteps, steps, train_steps)
        if problem is not None:
            raise ConformanceError(
                "set_timesteps",
                f"set_timesteps({steps}) returned {problem} ({timesteps.tolist()}); expected "
                f"{steps} distinct, strictly descending integers in [0, {train_steps - 1}], "
                "noisiest first: return rfsr_ray.models.diffusion.checked_timesteps(...)",
            )
        configured = getattr(model.scheduler, "timesteps", None)
        if configured is None or not torch.equal(timesteps.cpu(), configured.cpu()):
            raise ConformanceError(
                "set_timesteps",
                f"set_timesteps({steps}) returned {timesteps.tolist()} but model.scheduler holds "
                f"{configured!r}; expected it to configure model.scheduler (sampler_step steps "
                "with it) and return scheduler.timesteps",
            )


# ------------------------------------------------------------------ x̂0 and sampling
def ddim_step_from_x0(
    scheduler: DDIMScheduler, x0: torch.Tensor, latent: torch.Tensor, timestep: torch.Tensor
) -> torch.Tensor:
    """x_{t-1} of a DDIM (eta=0) step that predicts `x0` from x_t = `latent`, all (B, C, h, w):
    √ᾱ_prev·x̂0 + √(1−ᾱ_prev)·ε̂ with ε̂ = (x_t − √ᾱ_t·x̂0)/√(1−ᾱ_t). ᾱ_prev is taken at
    t − T // N as `DDIMScheduler.step` takes it, `final_alpha_cumprod` past the schedule's end."""
    abar = alpha_bar(scheduler, timestep, latent)
    epsilon = (latent - abar.sqrt() * x0) / (1 - abar).sqrt()
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    previous = int(timestep) - stride
    abar_prev = (
        scheduler.alphas_cumprod[previous] if previous >= 0 else scheduler.final_alpha_cumprod
    ).to(latent)
    return abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * epsilon


def _check_ddim_agreement(
    model: ISRDiffusionModel,
    case: ConformanceCase,
    point: Point,
    index: int,
    reference: bool,
) -> None:
    """At `point` = (condition, x_t, t): sampler_step(x_t) equals the DDIM step to predict_x0."""
    condition, latent, timestep = point
    with torch.no_grad():
        x0 = _predict(model, point, reference)
        with _calling("sampler_step"):
            stepped = model.sampler_step(
                latent, timestep, condition, _generator(case.seed), reference=reference
            )
    expected = ddim_step_from_x0(model.scheduler, x0.float(), latent.float(), timestep)
    error = _max_diff(stepped, expected)
    tolerance = _tolerance(case, expected)
    if not error <= tolerance:  # `not <=` also catches NaN
        raise ConformanceError(
            "predict_x0",
            f"with reference={reference}, x̂0 at timestep {int(timestep)} (sampler index {index}) "
            f"disagrees with sampler_step under DDIM (eta=0) by {error:.3g} > {tolerance:.3g}; "
            "expected sampler_step(x_t) = √ᾱ_prev·x̂0 + √(1−ᾱ_prev)·ε̂, ε̂ = (x_t − √ᾱ_t·x̂0)/"
            "√(1−ᾱ_t): return x̂0, not the raw denoiser output, in the scheduler's prediction "
            "type (rfsr_ray.models.diffusion.x0_from_model_output), and step with "
            "model.scheduler in sampler_step",
        )


def check_predict_x0(case: ConformanceCase) -> None:
    """`predict_x0` is the x̂0 `sampler_step` steps towards: under DDIM (eta=0, no clipping,
    swapped in as `model.scheduler`) one step from x_t is exactly the DDIM update to
    predict_x0(x_t), at sampler index 1 and at the last index (ᾱ_prev = final ᾱ), for the
    trained model and the frozen reference. This is what makes the x̂0 RFSR's trajectory mode
    scores the image inference would produce from the same x_t."""
    model = _build(case)
    model.scheduler = DDIMScheduler.from_config(
        model.scheduler.config, clip_sample=False, thresholding=False
    )
    checked = (1, case.num_inference_steps - 1)
    for reference in (False, True):
        generator = _generator(case.seed)
        condition, latent, timesteps = _start(model, case, "sample", generator)
        for index, timestep in enumerate(timesteps[: checked[-1] + 1]):
            if index in checked:
                _check_ddim_agreement(model, case, (condition, latent, timestep), index, reference)
            with torch.no_grad(), _calling("sampler_step"):
                latent = model.sampler_step(latent, timestep, condition, generator, reference)


def check_decode(case: ConformanceCase) -> None:
    """`decode(x̂0)` is a float (B, 3, H, W) image in [0, 1] that gradients flow back through
    (RFSR's losses score decoded x̂0), and `sample(lr, N)` returns the same kind of image."""
    model = _build(case)
    with torch.no_grad():
        x0 = _predict(model, _noisy_point(model, case, "sample"))
    latent = x0.detach().float().requires_grad_(True)
    with _calling("decode"):
        image = model.decode(latent)
    _check_image("decode", image, case, model.scale)
    if not image.requires_grad:
        raise ConformanceError(
            "decode",
            "the image does not require grad for a latent that does; expected a differentiable "
            "decode (RFSR backpropagates through it): no torch.no_grad(), detach or hard rounding",
        )
    with _calling("decode"):
        image.float().sum().backward()
    if latent.grad is None or not torch.isfinite(latent.grad).all() or not latent.grad.any():
        raise ConformanceError(
            "decode",
            "the latent's gradient is missing, non-finite or all zero after backward of the image; "
            "expected finite, nonzero gradients: clamp straight-through "
            "(image + (image.clamp(0, 1) - image).detach()), not with a hard clamp",
        )
    lr_image, _ = _images(case, model.scale)
    with _calling("sample"):
        sr_image = model.sample(lr_image, case.num_inference_steps, _generator(case.seed))
    _check_image("sample", sr_image, case, model.scale)


# ------------------------------------------------------------------ training
def check_reference(case: ConformanceCase) -> None:
    """`reference=True` is the frozen original: its x̂0 has no gradient, and after an optimiser
    step on trainable_parameters() its x̂0 and sampler_step are unchanged while the trained x̂0
    moved; before the step both agree (RFSR's Gram regulariser holds the trained model near
    its original: a shared copy regularises nothing, another network the wrong way)."""
    model = _build(case)
    point = _noisy_point(model, case, "train")
    condition, latent, timestep = point

    def reference_outputs() -> tuple[torch.Tensor, torch.Tensor]:
        x0 = _predict(model, point, reference=True)
        with torch.no_grad(), _calling("sampler_step"):
            step = model.sampler_step(latent, timestep, condition, _generator(case.seed), True)
        return x0, step

    reference_x0, reference_step = reference_outputs()
    if reference_x0.requires_grad:
        raise ConformanceError(
            "predict_x0",
            "with reference=True the x̂0 requires grad; expected the frozen original without "
            "gradient: compute it under torch.no_grad() with weights that never train",
        )
    trained_x0 = _predict(model, point)
    _require_grad(trained_x0)
    apart = _max_diff(trained_x0, reference_x0)
    if not apart <= _tolerance(case, trained_x0):
        raise ConformanceError(
            "predict_x0",
            f"before any training, reference=True gives an x̂0 {apart:.3g} away from the "
            "trained model's; expected the frozen original "
            "(the model as built): copy the trained weights for the reference, do not "
            "initialise it separately",
        )
    _adam_step(model, trained_x0.float().square().mean(), "predict_x0")
    after_x0, after_step = reference_outputs()
    moved = max(_max_diff(after_x0, reference_x0), _max_diff(after_step, reference_step))
    if not moved <= case.atol:
        raise ConformanceError(
            "predict_x0",
            f"with reference=True the output changed by {moved:.3g} (> atol {case.atol}) after an "
            "optimiser step on trainable_parameters(); expected the frozen original model: keep "
            "a frozen copy of the original trained weights for reference=True (as "
            "TinySRModel.reference_unet or rfsr_ray.models.latent.FrozenOriginal), never the "
            "trained modules themselves",
        )
    with torch.no_grad():
        change = _max_diff(_predict(model, point), trained_x0)
    if not change > case.atol:
        raise ConformanceError(
            "predict_x0",
            f"the trained x̂0 changed by only {change:.3g} (<= atol {case.atol}) after an Adam "
            f"step (lr {PERTURBATION_LR}) on trainable_parameters(); expected the trained output "
            "to depend on them: predict_x0(reference=False) must run the trained modules",
        )


def _parameter_names(model: ISRDiffusionModel, parameters: list[nn.Parameter]) -> dict[int, str]:
    """id → "module.parameter" for every parameter of trainable_modules(); refused unless
    every one of `parameters` is among them (checkpoints save only those modules)."""
    with _calling("trainable_modules"):
        modules = model.trainable_modules()
    names = {
        id(parameter): f"{module_name}.{name}"
        for module_name, module in modules.items()
        for name, parameter in module.named_parameters()
    }
    outside = [tuple(p.shape) for p in parameters if id(p) not in names]
    if outside:
        raise ConformanceError(
            "trainable_modules",
            f"{len(outside)} trainable parameters (shapes {outside[:3]}) are in none of "
            f"trainable_modules() {sorted(modules)}; expected every trainable parameter inside "
            "one of them (checkpoints and exports save those): return the modules that hold them",
        )
    return names


def _trainable(model: ISRDiffusionModel) -> list[nn.Parameter]:
    """trainable_parameters(), refused unless a non-empty list of parameters requiring grad."""
    with _calling("trainable_parameters"):
        parameters = list(model.trainable_parameters())
    wrong = [type(p).__name__ for p in parameters if not isinstance(p, nn.Parameter)]
    frozen = sum(1 for p in parameters if isinstance(p, nn.Parameter) and not p.requires_grad)
    if not parameters or wrong or frozen:
        raise ConformanceError(
            "trainable_parameters",
            f"returned {len(parameters)} entries ({len(wrong)} not nn.Parameter, {frozen} with "
            "requires_grad=False); expected the non-empty list of parameters RFSR updates, each "
            "requiring grad: build the model trainable (trainable=True)",
        )
    return parameters


def _gradient_problem(
    parameters: list[nn.Parameter], names: dict[int, str], require: bool = True
) -> ConformanceError | None:
    """Trainable parameters with a non-finite gradient after a backward pass (and, with
    `require`, those without one), or None."""
    missing = [names[id(p)] for p in parameters if p.grad is None] if require else []
    broken = [
        names[id(p)] for p in parameters if p.grad is not None and not torch.isfinite(p.grad).all()
    ]
    if not missing and not broken:
        return None
    return ConformanceError(
        "trainable_parameters",
        f"after backward of an RFSR loss {len(missing)} trainable parameters have no gradient "
        f"({missing[:3]}) and {len(broken)} a non-finite one ({broken[:3]}); expected a finite "
        ".grad on each: list only parameters on predict_x0's path and keep the trained forward "
        "differentiable in float32",
    )


def _leak_problem(
    model: ISRDiffusionModel, parameters: list[nn.Parameter]
) -> ConformanceError | None:
    """Parameters of the model (an nn.Module) outside `parameters` that got a gradient, or None."""
    if not isinstance(model, nn.Module):
        return None
    trainable = {id(p) for p in parameters}
    leaked = [
        n for n, p in model.named_parameters() if id(p) not in trainable and p.grad is not None
    ]
    if not leaked:
        return None
    return ConformanceError(
        "trainable_parameters",
        f"{len(leaked)} parameters outside trainable_parameters() got a gradient ({leaked[:3]}); "
        "expected frozen parts frozen: requires_grad_(False) on them, or list them in "
        "trainable_parameters()",
    )


def check_gradients(case: ConformanceCase) -> None:
    """Backward of RFSR's structure loss on decode(predict_x0) gives every trainable parameter a
    finite gradient and no frozen parameter one, and trainable_modules() holds every trainable
    parameter (what an optimiser updates is what a checkpoint saves)."""
    model = _build(case)
    parameters = _trainable(model)
    names = _parameter_names(model, parameters)
    x0 = _predict(model, _noisy_point(model, case, "train"))
    _require_grad(x0)
    with _calling("decode"):
        sr_image = model.decode(x0)
    _, hr_image = _images(case, model.scale)
    loss = StructureLoss(StructureLossConfig())(sr_image, hr_image)
    with _calling("predict_x0"):
        loss.backward()
    problem = _gradient_problem(parameters, names) or _leak_problem(model, parameters)
    if problem is not None:
        raise problem
    if not any(p.grad.any() for p in parameters):
        raise ConformanceError(
            "trainable_parameters",
            "every gradient is zero after backward of an RFSR loss; expected the loss to reach "
            "the trained weights: predict_x0 must depend on trainable_parameters()",
        )


def _sample(
    model: ISRDiffusionModel, case: ConformanceCase, seed: int, global_seed: int
) -> torch.Tensor:
    """SR (B, 3, H, W) of the case's LR batch with `torch.Generator().manual_seed(seed)`, torch's
    global RNG seeded with `global_seed` first (an adapter must not depend on it)."""
    lr_image, _ = _images(case, model.scale)
    torch.manual_seed(global_seed)
    with _calling("sample"):
        return model.sample(lr_image, case.num_inference_steps, _generator(seed))


def check_determinism(case: ConformanceCase) -> None:
    """`sample` with the same seeded generator gives the same image whatever torch's global RNG
    holds, and another seed a different one (seeded validation and resumable runs need both).
    The model takes one optimiser step first: a fresh residual model (zero last layer) is
    exactly bicubic upsampling, whatever its noise."""
    model = _build(case)
    _perturb(model, case)
    first = _sample(model, case, case.seed, global_seed=case.seed)
    again = _sample(model, case, case.seed, global_seed=case.seed + 1)
    other = _sample(model, case, case.seed + 1, global_seed=case.seed)
    if not _max_diff(first, again) <= case.atol:
        raise ConformanceError(
            "sample",
            f"two calls with torch.Generator().manual_seed({case.seed}) differ by "
            f"{_max_diff(first, again):.3g} (> atol {case.atol}); expected identical images: "
            "draw every random number (x_T, sampler noise, prompt dropout) from the `generator` "
            "argument, never from torch's global RNG",
        )
    if not _max_diff(first, other) > case.atol:
        raise ConformanceError(
            "sample",
            f"seeds {case.seed} and {case.seed + 1} give the same image; expected the generator "
            "to drive the noise: draw x_T in start_latent from the `generator` argument",
        )


def check_save_load(case: ConformanceCase) -> None:
    """What `save` writes after an optimiser step reloads (through `case.load`) into a model of
    the same family and scale that samples the same image with the same seed: exports keep
    every trained weight and the scheduler."""
    model = _build(case)
    _perturb(model, case)
    expected = _sample(model, case, case.seed, global_seed=case.seed)
    save = case.save or (lambda saved, path: Path(saved.save(path)))
    load = case.load or load_export
    with tempfile.TemporaryDirectory() as folder:
        with _calling("save"):
            path = Path(save(model, Path(folder) / "model"))
        with _calling("load"):
            loaded = load(path)
        actual = _sample(loaded, case, case.seed, global_seed=case.seed)
    if (loaded.family, loaded.scale) != (model.family, model.scale):
        raise ConformanceError(
            "save",
            f"reloaded a {loaded.family!r} x{loaded.scale} model from a {model.family!r} "
            f"x{model.scale} one; expected save to record the family and scale",
        )
    if actual.shape != expected.shape or not _max_diff(actual, expected) <= case.atol:
        difference = _max_diff(actual, expected) if actual.shape == expected.shape else "shape"
        raise ConformanceError(
            "save",
            f"the reloaded model samples differently from the saved one ({difference} > atol "
            f"{case.atol}); expected save(path) to write every trained weight (not the build's "
            "initial ones) and the scheduler, and load (ConformanceCase.load, default "
            "rfsr_ray.models.load_model) to read them back",
        )


# ------------------------------------------------------------------ DDP
@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """A 1-process gloo group for DDP, destroyed afterwards; one already running is used as it
    is (then every rank must run the check)."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as folder:
        store = dist.FileStore(str(Path(folder) / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def _check_wrappers(
    wrappers: object, plain: dict[str, nn.Module], model: ISRDiffusionModel
) -> dict[str, nn.Module]:
    """`wrappers` are DDP around each plain trainable module, and trainable_modules() still
    returns the plain modules."""
    matches = (
        isinstance(wrappers, dict)
        and set(wrappers) == set(plain)
        and all(
            isinstance(w, DistributedDataParallel) and w.module is plain[name]
            for name, w in wrappers.items()
        )
    )
    if not matches:
        raise ConformanceError(
            "wrap_trainable",
            f"returned {wrappers!r:.200}; expected {{name: wrap(module)}} for each of "
            f"trainable_modules() {sorted(plain)} (rfsr_ray.models.wrapping.TrainableWrappers)",
        )
    _check_plain(model, plain, "wrap_trainable")
    return wrappers


def _check_plain(model: ISRDiffusionModel, plain: dict[str, nn.Module], method: str) -> None:
    with _calling("trainable_modules"):
        modules = model.trainable_modules()
    if set(modules) != set(plain) or any(modules[n] is not m for n, m in plain.items()):
        kinds = {name: type(module).__name__ for name, module in modules.items()}
        raise ConformanceError(
            "trainable_modules",
            f"after {method} returns {kinds}; expected the same plain modules as before (never "
            "their DDP wrappers: checkpoints and exports save these): keep the wrappers beside "
            "the modules (rfsr_ray.models.wrapping.TrainableWrappers)",
        )


def _count_forwards(wrappers: dict[str, nn.Module]) -> tuple[list[str], list[Any]]:
    """(a list that grows by a name on each wrapper forward, the hook handles to remove)."""
    calls: list[str] = []
    handles = [
        wrapper.register_forward_pre_hook(lambda module, args, name=name: calls.append(name))
        for name, wrapper in wrappers.items()
    ]
    return calls, handles


def check_ddp(case: ConformanceCase) -> None:
    """Training under DDP works: after wrap_trainable(DistributedDataParallel) in a 1-process
    gloo group the trained predict_x0 runs through the wrappers (so DDP all-reduces its
    gradients), a backward and optimiser step give finite gradients and move the output, and
    after unwrap_trainable() forward passes skip the wrappers; trainable_modules() returns the
    plain modules throughout."""
    model = _build(case)
    plain = _trainable_modules(model)
    with _process_group():
        with _calling("wrap_trainable"):
            wrappers = model.wrap_trainable(lambda module: DistributedDataParallel(module))
        calls, handles = _count_forwards(_check_wrappers(wrappers, plain, model))
        point = _noisy_point(model, case, "train")
        calls.clear()  # sampler_step may or may not use them; the trained x̂0 must
        x0 = _predict(model, point)
        if not calls:
            raise ConformanceError(
                "wrap_trainable",
                "the trained predict_x0 never called the wrappers; expected the trained forward "
                "to run through them (else DDP never all-reduces gradients): call "
                "self.forward_module(name) (TrainableWrappers) in the trained forward pass",
            )
        _require_grad(x0)
        _adam_step(model, x0.float().square().mean(), "predict_x0")
        with torch.no_grad():
            change = _max_diff(_predict(model, point), x0)
        with _calling("unwrap_trainable"):
            model.unwrap_trainable()
        calls.clear()
        with torch.no_grad():
            _predict(model, point)
        for handle in handles:
            handle.remove()
    if not change > case.atol:
        raise ConformanceError(
            "wrap_trainable",
            f"an optimiser step through the DDP wrappers changed the trained x̂0 by only "
            f"{change:.3g}; expected the wrapped modules to be the trained ones",
        )
    if calls:
        raise ConformanceError(
            "unwrap_trainable",
            "forward passes still run through the wrappers; expected the plain modules again",
        )
    _check_plain(model, plain, "unwrap_trainable")


def _trainable_modules(model: ISRDiffusionModel) -> dict[str, nn.Module]:
    with _calling("trainable_modules"):
        modules = model.trainable_modules()
    if (
        not isinstance(modules, dict)
        or not modules
        or not all(isinstance(m, nn.Module) for m in modules.values())
    ):
        raise ConformanceError(
            "trainable_modules",
            f"returned {modules!r:.200}; expected a non-empty dict of name → nn.Module",
        )
    return dict(modules)


# ------------------------------------------------------------------ running the checks
CHECKS: dict[str, Callable[[ConformanceCase], None]] = {
    "protocol": check_protocol,
    "set_timesteps": check_set_timesteps,
    "predict_x0": check_predict_x0,
    "decode": check_decode,
    "reference": check_reference,
    "gradients": check_gradients,
    "determinism": check_determinism,
    "save_load": check_save_load,
    "ddp": check_ddp,
}


def _selected(only: Iterable[str] | None) -> list[str]:
    if only is None:
        return list(CHECKS)
    names = list(only)
    unknown = [name for name in names if name not in CHECKS]
    if unknown:
        raise ValueError(f"unknown conformance checks {unknown}; choose from {list(CHECKS)}")
    return [name for name in CHECKS if name in names]


def _combined(failures: dict[str, ConformanceError], skipped: list[str]) -> ConformanceError:
    """One error listing every failure, a line each (starting with its method), then a summary."""
    lines = [f"{error} [check {name}]" for name, error in failures.items()]
    summary = f"{len(failures)} conformance check(s) failed: {', '.join(failures)}"
    if skipped:
        summary += f"; skipped {', '.join(skipped)} (fix the protocol first)"
    first = next(iter(failures.values()))
    text = "\n".join([*lines, summary])
    combined = ConformanceError(first.method, text.removeprefix(f"{first.method}: "))
    combined.failures = dict(failures)
    return combined


def check_isr_model(case: ConformanceCase, only: Iterable[str] | None = None) -> None:
    """Run every check of `CHECKS` (or those named in `only`) on `case`, in order; raise one
    `ConformanceError` listing each failed check, a line each naming the method that broke.
    A failed protocol check skips the rest (they would only fail on the missing members)."""
    names = _selected(only)
    failures: dict[str, ConformanceError] = {}
    for position, name in enumerate(names):
        try:
            CHECKS[name](case)
        except ConformanceError as error:
            failures[name] = error
        except Exception as error:  # the kit's own step failed on the model: say where
            failures[name] = ConformanceError(name, f"raised {type(error).__name__}: {error}")
            failures[name].__cause__ = error
        if name == "protocol" and failures:
            skipped = names[position + 1 :]
            break
    else:
        skipped = []
    if failures:
        raise _combined(failures, skipped) from next(iter(failures.values()))


class ISRModelConformance:
    """pytest mixin: subclass it in a test module (name the subclass `Test...`), implement
    `build_model` (and optionally `load_model` / `save_model`, class attributes `lr_size`,
    `batch_size`, `num_inference_steps`, `seed`, `atol`), and pytest collects one test per
    check: test_protocol, test_set_timesteps, test_predict_x0, test_decode, test_reference,
    test_gradients, test_determinism, test_save_load, test_ddp."""

    lr_size: int = 8
    batch_size: int = 2
    num_inference_steps: int = 4
    seed: int = 0
    atol: float = 1e-5

    def build_model(self) -> ISRDiffusionModel:
        raise NotImplementedError(
            f"{type(self).__name__}.build_model: return a fresh trainable model, seeded "
            "(torch.manual_seed) so that every call gives the same weights"
        )

    def load_model(self, path: Path) -> ISRDiffusionModel:
        """Reload what `save_model` wrote; default `rfsr_ray.models.load_model`."""
        return load_export(path)

    def save_model(self, model: ISRDiffusionModel, path: Path) -> Path:
        """Write `model` to `path`; default `model.save(path)`."""
        return Path(model.save(path))

    def conformance_case(self) -> ConformanceCase:
        return ConformanceCase(
            build=self.build_model,
            load=self.load_model,
            save=self.save_model,
            lr_size=self.lr_size,
            batch_size=self.batch_size,
            num_inference_steps=self.num_inference_steps,
            seed=self.seed,
            atol=self.atol,
        )

    def run_check(self, name: str) -> None:
        check_isr_model(self.conformance_case(), only=[name])

    def test_protocol(self) -> None:
        self.run_check("protocol")

    def test_set_timesteps(self) -> None:
        self.run_check("set_timesteps")

    def test_predict_x0(self) -> None:
        self.run_check("predict_x0")

    def test_decode(self) -> None:
        self.run_check("decode")

    def test_reference(self) -> None:
        self.run_check("reference")

    def test_gradients(self) -> None:
        self.run_check("gradients")

    def test_determinism(self) -> None:
        self.run_check("determinism")

    def test_save_load(self) -> None:
        self.run_check("save_load")

    def test_ddp(self) -> None:
        self.run_check("ddp")
