"""The index → timestep map RFSR trains on: the reference's t_i = 981 − 20·i for 50 steps of a
Stable Diffusion 2 base folder, whatever scheduler the folder ships; a refused schedule for any
scheduler that does not give N distinct descending timesteps; and where `lr_latent` starts."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler
from diffusers.utils.torch_utils import randn_tensor

from rfsr_ray.config import TinyModelConfig, build_config, load_config
from rfsr_ray.errors import ConfigError
from rfsr_ray.models import build_model
from rfsr_ray.models.diffusion import checked_timesteps, timesteps_problem
from rfsr_ray.models.sd_components import load_scheduler
from rfsr_ray.models.tiny import TinySRModel, build_unet
from rfsr_ray.schedule import describe_timesteps
from rfsr_ray.testing.tiny_components import save_tiny_components

REPO = Path(__file__).resolve().parents[2]
REFERENCE_CONFIG = REPO / "configs" / "finetune" / "controlnet_sr_rfsr.yaml"
REFERENCE_TIMESTEPS = [981 - 20 * i for i in range(50)]  # DDPMScheduler.set_timesteps(50)

# stabilityai/stable-diffusion-2-base's scheduler/scheduler_config.json, byte for byte (308 bytes).
# Sources: the hub's file listing of luongphamit/stable-diffusion-2-base ("Duplicate from
# stabilityai/stable-diffusion-2-base") gives scheduler_config.json as 308 bytes; this text, as
# diffusers 0.8.0 wrote it, is exactly that. The same 308-byte file is shown in full in
# osanseviero/endpoint-test (a duplicate of stabilityai/stable-diffusion-2-inpainting), and
# stabilityai/stable-diffusion-2-1-base's (shown in glowforge-dev/stable-diffusion-2-1-img2img-
# jonathan2, 346 bytes) differs only by "prediction_type": "epsilon" (the default when absent)
# and "_diffusers_version": "0.10.0.dev0".
SD2_BASE_SCHEDULER_CONFIG = """\
{
  "_class_name": "PNDMScheduler",
  "_diffusers_version": "0.8.0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "clip_sample": false,
  "num_train_timesteps": 1000,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "trained_betas": null
}
"""
SD21_BASE_SCHEDULER_CONFIG = SD2_BASE_SCHEDULER_CONFIG.replace(
    '"num_train_timesteps": 1000,\n',
    '"num_train_timesteps": 1000,\n  "prediction_type": "epsilon",\n',
).replace('"0.8.0"', '"0.10.0.dev0"')


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory) -> Path:
    """Tiny random controlnet_sr components whose scheduler is SD 2 base's, as shipped."""
    folder = save_tiny_components("controlnet_sr", tmp_path_factory.mktemp("sd2") / "base")
    (folder / "scheduler" / "scheduler_config.json").write_text(SD2_BASE_SCHEDULER_CONFIG)
    return folder


def scheduler_folder(tmp_path: Path, text: str) -> Path:
    folder = tmp_path / "scheduler"
    folder.mkdir()
    (folder / "scheduler_config.json").write_text(text)
    return folder


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def controlnet_sr(folder: Path, **controlnet_sr: object):
    model = {"family": "controlnet_sr", "pretrained": str(folder), "controlnet_sr": controlnet_sr}
    return build_model(build_config({"model": model}).model, 4, trainable=False)


# ------------------------------------------------------------------------------ the folder's own
def test_the_pinned_sd2_base_scheduler_is_pndm_with_a_repeated_timestep(tmp_path):
    """The premise: SD 2 base's own scheduler gives 51 timesteps for 50 steps, 961 twice."""
    own = PNDMScheduler.from_pretrained(scheduler_folder(tmp_path, SD2_BASE_SCHEDULER_CONFIG))
    own.set_timesteps(50)
    assert len(own.timesteps) == 51 and own.timesteps[:3].tolist() == [981, 961, 961]
    assert own.timesteps[19].item() == 621 and own.timesteps[-1].item() == 1


@pytest.mark.parametrize("text", [SD2_BASE_SCHEDULER_CONFIG, SD21_BASE_SCHEDULER_CONFIG])
def test_unset_sampler_rebuilds_pndm_as_ddim_and_says_so_once(tmp_path, caplog, text):
    with caplog.at_level(logging.INFO, logger="rfsr_ray.models.sd_components"):
        scheduler = load_scheduler(scheduler_folder(tmp_path, text), None)
    assert type(scheduler) is DDIMScheduler
    assert checked_timesteps(scheduler, 50).tolist() == REFERENCE_TIMESTEPS
    records = [r for r in caplog.records if r.name == "rfsr_ray.models.sd_components"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    message = records[0].getMessage()
    for needed in ("model.sampler", "PNDMScheduler", "51 timesteps for 50 steps (961 repeated)",
                   "DDIMScheduler", "0→981, 1→961, 2→941 … 47→41, 48→21, 49→1"):  # fmt: skip
        assert needed in message, message


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_explicit_samplers_give_the_reference_timesteps(tmp_path, sampler):
    scheduler = load_scheduler(scheduler_folder(tmp_path, SD2_BASE_SCHEDULER_CONFIG), sampler)
    assert checked_timesteps(scheduler, 50).tolist() == REFERENCE_TIMESTEPS


def test_fit_and_sigma_space_schedulers_are_kept_as_saved(tmp_path, caplog):
    """A DDIM folder is used as is, silently; a sigma-space one is not rebuilt behind the
    user's back (the latent model refuses it with its own message)."""
    ddim = DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1)
    ddim.save_pretrained(tmp_path / "ddim")
    EulerDiscreteScheduler(beta_schedule="scaled_linear").save_pretrained(tmp_path / "euler")
    with caplog.at_level(logging.INFO, logger="rfsr_ray.models.sd_components"):
        kept = load_scheduler(tmp_path / "ddim", None)
    assert type(kept) is DDIMScheduler and kept.config.steps_offset == 1
    assert not [r for r in caplog.records if r.name == "rfsr_ray.models.sd_components"]
    assert type(load_scheduler(tmp_path / "euler", None)) is EulerDiscreteScheduler


# ------------------------------------------------------------------------------ through a model
def test_controlnet_sr_on_an_sd2_base_folder_trains_on_the_reference_timesteps(sd2_folder):
    model = controlnet_sr(sd2_folder)
    timesteps = model.set_timesteps(50)
    assert timesteps.tolist() == REFERENCE_TIMESTEPS
    # The examples: index 19 → 601, 40 → 181, 49 → 1 (PNDM gave 621, 201, 21).
    assert [timesteps[i].item() for i in (19, 40, 49)] == [601, 181, 1]


def test_the_reference_config_gives_the_reference_timesteps(sd2_folder):
    cfg = load_config(
        REFERENCE_CONFIG,
        [f"model.pretrained={sd2_folder}", "data.patch_size=32", "data.batch_size=2",
         "train.batch_size=1", "train.num_workers=1", "train.use_gpu=false"],
    )  # fmt: skip
    assert cfg.model.sampler is None and cfg.schedule.num_inference_steps == 50
    model = build_model(cfg.model, cfg.data.scale, trainable=False)
    assert model.set_timesteps(cfg.schedule.num_inference_steps).tolist() == REFERENCE_TIMESTEPS


# ------------------------------------------------------------------------------ the guard
class ListScheduler:
    """A stand-in whose set_timesteps(N) yields a fixed list, whatever N."""

    config = SimpleNamespace(num_train_timesteps=1000)

    def __init__(self, values: list[float]) -> None:
        self.values = values

    def set_timesteps(self, num_inference_steps: int, device: object = None) -> None:
        self.timesteps = torch.tensor(self.values, device=device)


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ([750, 500, 500, 250], "repeated timesteps (500 repeated)"),
        ([750, 500, 250], "3 timesteps for 4 steps"),
        ([751, 501, 501, 251, 1], "5 timesteps for 4 steps (501 repeated)"),
        ([0, 250, 500, 750], "timesteps that do not strictly descend"),
        ([750.5, 500.0, 250.0, 0.0], "non-integer timesteps"),
        ([1000, 750, 500, 250], "timesteps outside [0, 999]"),
    ],
)
def test_the_guard_refuses_a_schedule_that_is_not_one_timestep_per_index(values, problem):
    with pytest.raises(ConfigError, match=r"set model\.sampler=ddim") as refused:
        checked_timesteps(ListScheduler(values), 4)
    assert problem in str(refused.value) and "ListScheduler.set_timesteps(4)" in str(refused.value)


def test_the_guard_passes_a_fit_schedule_through_unchanged():
    assert timesteps_problem(torch.tensor([750, 500, 250, 0]), 4, 1000) is None
    assert checked_timesteps(ListScheduler([750, 500, 250, 0]), 4).tolist() == [750, 500, 250, 0]


def test_pndm_is_refused_by_the_guard_and_by_the_tiny_family(tmp_path):
    pndm = PNDMScheduler.from_pretrained(scheduler_folder(tmp_path, SD2_BASE_SCHEDULER_CONFIG))
    with pytest.raises(ConfigError, match=r"51 timesteps for 50 steps \(961 repeated\)"):
        checked_timesteps(pndm, 50)
    tiny_cfg = TinyModelConfig()
    tiny = TinySRModel(build_unet(tiny_cfg), pndm, scale=4)
    with pytest.raises(ConfigError, match=r"model\.sampler"):
        tiny.set_timesteps(8)


def test_describe_timesteps_shows_the_ends_of_the_map():
    described = describe_timesteps(
        torch.tensor(REFERENCE_TIMESTEPS), scheduler_name="DDIMScheduler"
    )
    assert described == "0→981, 1→961, 2→941 … 47→41, 48→21, 49→1 (50 steps, DDIMScheduler)"
    assert describe_timesteps([750, 500, 250, 0]) == "0→750, 1→500, 2→250, 3→0 (4 steps)"
    assert describe_timesteps(REFERENCE_TIMESTEPS, head=1, tail=1) == "0→981 … 49→1 (50 steps)"


# ------------------------------------------------------------------------------ lr_latent start
def lr_latent_start(model, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_T from the model, and the LR latent and noise it was made of (same generator draws)."""
    lr = torch.rand(2, 3, 8, 8, generator=seeded(0))
    condition = model.condition(lr, seeded(0))
    x_t = model.start_latent(condition, seeded(seed))
    generator = seeded(seed)
    clean = model.encode(condition.control, generator)
    noise = randn_tensor(clean.shape, generator=generator, dtype=clean.dtype)
    return x_t, clean, noise


def at(model, clean: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
    return model.scheduler.add_noise(clean, noise, torch.full((clean.shape[0],), timestep))


def test_final_train_noises_the_lr_latent_to_the_last_training_timestep(sd2_folder):
    model = controlnet_sr(sd2_folder, start="lr_latent")  # lr_latent_timestep: final_train
    abar = model.scheduler.alphas_cumprod
    assert abar[999].sqrt().item() == pytest.approx(0.068, abs=5e-4)  # SeeSR's x_T
    assert abar[981].sqrt().item() == pytest.approx(0.076, abs=5e-4)  # the first inference t
    model.set_timesteps(50)
    x_t, clean, noise = lr_latent_start(model)
    assert torch.equal(x_t, at(model, clean, noise, 999))
    assert not torch.allclose(x_t, at(model, clean, noise, 981))


def test_first_inference_noises_the_lr_latent_to_the_first_timestep(sd2_folder):
    model = controlnet_sr(sd2_folder, start="lr_latent", lr_latent_timestep="first_inference")
    model.set_timesteps(50)
    x_t, clean, noise = lr_latent_start(model)
    assert torch.equal(x_t, at(model, clean, noise, 981))


def test_final_train_does_not_depend_on_the_inference_schedule(sd2_folder, tmp_path):
    """T-1 comes from the training schedule, so it is the same for 4 or 50 steps and for a
    trailing-spaced DDIM whose first inference timestep is 999 too."""
    model = controlnet_sr(sd2_folder, start="lr_latent")
    starts = []
    for steps in (4, 50):
        model.set_timesteps(steps)
        starts.append(lr_latent_start(model)[0])
    assert torch.equal(starts[0], starts[1])
    trailing = shutil.copytree(sd2_folder, tmp_path / "trailing")
    scheduler = DDIMScheduler.from_pretrained(sd2_folder / "scheduler", timestep_spacing="trailing")
    scheduler.save_pretrained(trailing / "scheduler")
    first = controlnet_sr(trailing, start="lr_latent", lr_latent_timestep="first_inference")
    assert first.set_timesteps(50)[0].item() == 999
    assert torch.equal(lr_latent_start(first)[0], starts[1])
