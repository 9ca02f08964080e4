"""The adapter conformance kit passes on every built-in family (through the pytest mixin and
through `check_isr_model`) and fails, naming the broken method, on adapters broken one way each."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from rfsr_ray.config import ModelConfig
from rfsr_ray.models import build_model
from rfsr_ray.models.tiny import TinySRModel
from rfsr_ray.testing.conformance import (
    CHECKS,
    ConformanceCase,
    ConformanceError,
    ISRModelConformance,
    check_isr_model,
)
from tests.unit.helpers import latent_config, tiny_config

LORA = {"finetune": "lora", "lora": {"enabled": True, "rank": 4}}


def build_tiny(**model: object) -> TinySRModel:
    """The tiny x4 family of `tiny_config`, seeded: the same weights on every call."""
    cfg = tiny_config(model=model)
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.data.scale)


def builder(cfg: ModelConfig, scale: int = 4) -> Callable[[], object]:
    def build() -> object:
        torch.manual_seed(0)
        return build_model(cfg, scale)

    return build


# ------------------------------------------------------------------ the mixin, as users write it
class TestTinyConformance(ISRModelConformance):
    """The tiny pixel family through the mixin: pytest collects one test per check."""

    def build_model(self) -> TinySRModel:
        return build_tiny()


class TestSDUpscalerConformance(ISRModelConformance):
    """A latent family through the mixin, its components from a pytest fixture."""

    @pytest.fixture(autouse=True)
    def _components(self, folders: dict[str, Path]) -> None:
        self.model_config = latent_config(folders, "sd_upscaler").model

    def build_model(self) -> object:
        return builder(self.model_config)()


def test_the_mixin_has_one_test_per_check():
    tests = {name for name in dir(ISRModelConformance) if name.startswith("test_")}
    assert tests == {f"test_{name}" for name in CHECKS}


# ------------------------------------------------------------------ every other built-in family
FAMILIES = {
    "tiny-residual": ("tiny", {"tiny": {"residual": True, "prediction_type": "sample"}}),
    "tiny-v": ("tiny", {"tiny": {"prediction_type": "v_prediction"}}),
    "controlnet_sr": ("controlnet_sr", {}),
    "sd_upscaler-lora": ("sd_upscaler", LORA),
}


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("variant", FAMILIES)
def test_every_built_in_family_conforms(folders, variant, check):
    """One test per family and check, so each stays within the unit-test time budget."""
    family, model = FAMILIES[variant]
    if family == "tiny":
        cfg = tiny_config(model=model).model
    else:
        cfg = latent_config(folders, family, **model).model
    check_isr_model(ConformanceCase(build=builder(cfg)), only=[check])


TINY_DDPM = ConformanceCase(build=builder(tiny_config(model={"sampler": "ddpm"}).model))


def test_tiny_with_the_ddpm_sampler_conforms_and_reloads_as_ddpm():
    # save_load failed here until TinySRModel.from_pretrained read the saved scheduler class
    check_isr_model(TINY_DDPM)


def test_the_ddp_check_leaves_no_process_group_behind():
    check_isr_model(ConformanceCase(build=build_tiny), only=["ddp"])
    assert not dist.is_initialized()


# ------------------------------------------------------------------ adapters broken one way each
class RawOutputX0(TinySRModel):
    """predict_x0 returns the denoiser's ε̂ instead of x̂0."""

    def predict_x0(self, latent, timestep, condition, reference=False):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not reference):
            return self.model_output(latent, timestep, condition, reference)


class SharedReference(TinySRModel):
    """The 'frozen' reference is the trained UNet itself."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reference_unet = self.unet


class OffsetReference(TinySRModel):
    """The reference is some other network than the model as built."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        with torch.no_grad():
            for parameter in self.reference_unet.parameters():
                parameter.add_(0.1)


class SignedDecode(TinySRModel):
    """decode returns [-1, 1] images."""

    def decode(self, latent):
        return super().decode(latent) * 2 - 1


class AscendingTimesteps(TinySRModel):
    """set_timesteps returns the schedule cleanest first."""

    def set_timesteps(self, num_inference_steps):
        return super().set_timesteps(num_inference_steps).flip(0)


class GlobalNoise(TinySRModel):
    """x_T comes from torch's global RNG, not the generator."""

    def start_latent(self, condition, generator):
        return torch.randn(condition.shape)


class IgnoresWrappers(TinySRModel):
    """The trained forward calls the plain UNet, never its DDP wrapper."""

    def _denoiser(self, reference: bool) -> nn.Module:
        return self.reference_unet if reference else self.unet


class LeakyParameters(TinySRModel):
    """trainable_parameters() leaves out conv_in, which still trains (gets a gradient)."""

    def trainable_parameters(self):
        return [p for n, p in self.unet.named_parameters() if not n.startswith("conv_in.")]


class FailingStep(TinySRModel):
    def sampler_step(self, *args, **kwargs):
        raise RuntimeError("scheduler exploded")


def tiny_as(cls: type[TinySRModel]) -> Callable[[], TinySRModel]:
    """A build function of the seeded tiny model rebuilt as the broken subclass `cls`."""

    def build() -> TinySRModel:
        model = build_tiny()
        return cls(model.unet, model.scheduler, model.scale, model.residual)

    return build


def failure(case: ConformanceCase, only: list[str] | None = None) -> ConformanceError:
    with pytest.raises(ConformanceError) as caught:
        check_isr_model(case, only=only)
    return caught.value


@pytest.mark.parametrize(
    ("cls", "check", "start", "detail"),
    [
        (SharedReference, "reference", "predict_x0: with reference=True the output changed",
         "frozen copy of the original"),
        (OffsetReference, "reference", "predict_x0: before any training, reference=True gives",
         "the model as built"),
        (SignedDecode, "decode", "decode: values span [-1", "expected finite images in [0, 1]"),
        (AscendingTimesteps, "set_timesteps",
         "set_timesteps: set_timesteps(4) returned timesteps that do not strictly descend",
         "noisiest first"),
        (GlobalNoise, "determinism",
         "sample: two calls with torch.Generator().manual_seed(0) differ", "global RNG"),
        (IgnoresWrappers, "ddp", "wrap_trainable: the trained predict_x0 never called the "
         "wrappers", "forward_module"),
        (LeakyParameters, "gradients", "trainable_parameters: 2 parameters outside "
         "trainable_parameters() got a gradient", "unet.conv_in.weight"),
        (FailingStep, "predict_x0", "sampler_step: raised RuntimeError: scheduler exploded", ""),
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else None,
)  # fmt: skip
def test_a_broken_adapter_fails_naming_the_method(cls, check, start, detail):
    error = failure(ConformanceCase(build=tiny_as(cls)), only=[check])
    assert str(error).startswith(start), str(error)
    assert detail in str(error)
    assert set(error.failures) == {check}


class SignedDecodeConformance(ISRModelConformance):  # no Test prefix: pytest skips it
    lr_size = 4

    def build_model(self) -> TinySRModel:
        return tiny_as(SignedDecode)()


def test_a_mixin_test_fails_on_its_own_check_with_the_class_settings():
    suite = SignedDecodeConformance()
    assert suite.conformance_case().lr_size == 4
    with pytest.raises(ConformanceError, match=r"^decode: values span \[-1"):
        suite.test_decode()
    suite.test_set_timesteps()  # every check is a test of its own


def test_a_raw_model_output_fails_only_the_predict_x0_check():
    error = failure(ConformanceCase(build=tiny_as(RawOutputX0)))
    assert set(error.failures) == {"predict_x0"}, str(error)
    assert str(error).startswith("predict_x0: with reference=False, x̂0 at timestep 749")
    assert "not the raw denoiser output" in str(error)
    assert str(error).endswith("1 conformance check(s) failed: predict_x0")


def test_a_save_that_drops_the_training_fails_save_load():
    def save_fresh(model: TinySRModel, path: Path) -> Path:
        return build_tiny().save(path)  # the build's weights, not the trained ones

    error = failure(ConformanceCase(build=build_tiny, save=save_fresh), only=["save_load"])
    assert str(error).startswith("save: the reloaded model samples differently")


def test_an_object_missing_members_fails_the_protocol_and_skips_the_rest():
    class Incomplete:
        family, scale = "incomplete", 4

        def decode(self, latent):
            return latent

    error = failure(ConformanceCase(build=Incomplete))
    assert set(error.failures) == {"protocol"}
    message = str(error)
    assert message.startswith("condition: Incomplete lacks the ISRDiffusionModel members")
    assert "'predict_x0'" in message and "'decode'" not in message.split("\n")[0]
    assert "skipped set_timesteps, predict_x0" in message


def test_unknown_check_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown conformance checks \['predict'\].*'predict_x0'"):
        check_isr_model(ConformanceCase(build=build_tiny), only=["predict"])


def test_a_case_needs_two_steps_to_step_into_a_trajectory():
    with pytest.raises(ValueError, match="num_inference_steps=1"):
        ConformanceCase(build=build_tiny, num_inference_steps=1)
