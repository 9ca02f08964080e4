"""Loading Stable Diffusion components from a local diffusers folder (hub ids are resolved to
one by `rfsr_ray.hub` first), so loading never reaches for the network."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import diffusers
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, SchedulerMixin
from torch import nn

from rfsr_ray.errors import WeightsError
from rfsr_ray.hub import require_component
from rfsr_ray.models.diffusion import is_variance_preserving, timesteps_problem
from rfsr_ray.schedule import describe_timesteps

logger = logging.getLogger(__name__)

# Step counts a folder's own scheduler is tried with before it may drive RFSR: the reference's
# 50 down to the short schedules of tests and smoke runs. Probing, rather than listing known-bad
# classes, also catches schedulers we have not met; any other N is still checked at run time by
# `checked_timesteps`, which refuses instead of rebuilding.
PROBE_STEPS = (50, 20, 4)


def load_scheduler(folder: Path, sampler: str | None) -> SchedulerMixin:
    """DDIM/DDPM built from the config saved in `folder` (`model.sampler`), or with `sampler`
    None the saved scheduler itself, unless its N-step schedule is not N distinct descending
    timesteps (PNDM with skip_prk_steps, which SD 1.x and SD 2 base ship: N+1 with a repeat);
    then DDIMScheduler from the same config, said in one INFO log line."""
    scheduler = _saved_scheduler(folder)
    if sampler == "ddim":
        return DDIMScheduler.from_config(scheduler.config)
    if sampler == "ddpm":
        return DDPMScheduler.from_config(scheduler.config)
    failure = _probe_failure(scheduler)
    if failure is None:
        return scheduler
    steps, problem = failure
    rebuilt = DDIMScheduler.from_config(scheduler.config)
    shown = copy.deepcopy(rebuilt)  # the returned one stays unset, as a loaded one is
    shown.set_timesteps(steps)
    logger.info(
        "model.sampler is unset and the folder's %s.set_timesteps(%d) gives %s, so RFSR uses "
        "DDIMScheduler built from the same config: %s; set model.sampler=ddim or ddpm to choose",
        type(scheduler).__name__,
        steps,
        problem,
        describe_timesteps(shown.timesteps, scheduler_name="DDIMScheduler"),
    )
    return rebuilt


def _saved_scheduler(folder: Path) -> SchedulerMixin:
    config_file = folder / "scheduler_config.json"
    if not config_file.is_file():
        raise WeightsError(f"{folder} has no scheduler_config.json; not a diffusers scheduler")
    name = json.loads(config_file.read_text()).get("_class_name", "DDIMScheduler")
    scheduler_cls = getattr(diffusers, name, None)
    if scheduler_cls is None:
        raise WeightsError(f"{config_file} names unknown scheduler class {name!r}")
    return scheduler_cls.from_pretrained(folder)


def _probe_failure(scheduler: SchedulerMixin) -> tuple[int, str] | None:
    """The first of `PROBE_STEPS` whose schedule is unfit for RFSR, with what is wrong, or None.

    Sigma-space samplers are left alone: rebuilding them as DDIM would hide that they were
    chosen; `check_scheduler` refuses them with its own message.
    """
    if not is_variance_preserving(scheduler):
        return None
    probe = copy.deepcopy(scheduler)  # set_timesteps mutates; the loaded one stays unset
    for steps in PROBE_STEPS:
        probe.set_timesteps(steps)
        problem = timesteps_problem(probe.timesteps, steps, probe.config.num_train_timesteps)
        if problem is not None:
            return steps, problem
    return None


def load_text_parts(folder: Path, key: str) -> tuple[nn.Module, object]:
    from transformers import CLIPTextModel, CLIPTokenizer

    text_encoder = CLIPTextModel.from_pretrained(
        require_component(folder, "text_encoder", key), local_files_only=True
    )
    tokenizer = CLIPTokenizer.from_pretrained(
        require_component(folder, "tokenizer", key), local_files_only=True
    )
    return text_encoder, tokenizer


def load_vae(folder: Path, key: str) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(
        require_component(folder, "vae", key), local_files_only=True
    )


def load_unet(folder: Path, key: str) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(
        require_component(folder, "unet", key), local_files_only=True
    )
