"""Our `seesr` sampler against SeeSR's own sampling loop, step by step, on tiny components.

The loop below restates `StableDiffusionControlNetPipeline.__call__` of SeeSR's
`pipelines/pipeline_seesr.py` (github.com/cswry/SeeSR) as `test_seesr.py` calls it:
`start_point='lr'`, `start_steps=999`, classifier-free guidance with the added and the negative
prompt, `guess_mode=False`, no latent tiling (the input is below its 256×256-latent tile). It
uses diffusers' scheduler built from the folder (SeeSR's `DDPMScheduler.from_pretrained`) and
our SeeSR modules, and none of `SeeSRModel`'s sampling code.

Two deliberate differences, both in `SeeSRModel.start_latent`'s docstring, are not restated:
SeeSR draws the LR latent's posterior sample from torch's global RNG (`latent_dist.sample()`
without the generator), ours from the sampling generator, so the restatement draws it from the
generator at the same point of the order; and SeeSR noises sample 0's LR latent for the whole
batch, ours each sample's own (the comparison runs one image, as test_seesr.py does).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from rfsr_ray.config import ModelConfig
from rfsr_ray.models import build_model
from rfsr_ray.testing.tiny_components import TINY_TAGGER, save_tiny_components

STEPS = 4
GUIDANCE = 5.5  # the RFSR reference's SeeSR sampling guidance
NEGATIVE = "dotted, noise, blur, lowres, smooth"  # test_seesr.py's defaults
ADDED = "clean, high-resolution, 8k"
USER_PROMPT = "a photo"  # test_seesr.py's --prompt
START_STEPS = 999
ATOL = 1e-5


@pytest.fixture(scope="module")
def seesr_folder(tmp_path_factory) -> Path:
    return save_tiny_components("seesr", tmp_path_factory.mktemp("seesr") / "seesr")


def tiny_seesr(folder: Path, sampler: str):
    files = {key: str(folder / name) for key, name in TINY_TAGGER.items()}
    cfg = ModelConfig(
        family="seesr",
        pretrained=str(folder),
        sampler=sampler,
        prompt={"text": USER_PROMPT, "negative": NEGATIVE, "guidance_scale": GUIDANCE},
        seesr={"tagger_size": "tiny", "added_prompt": ADDED, **files},
    )
    return build_model(cfg, 4, trainable=False)


def encode_text(model, text: str) -> torch.Tensor:
    """SeeSR's `_encode_prompt` for one prompt: max-length padding, truncation, hidden states."""
    tokens = model.tokenizer(
        [text],
        padding="max_length",
        max_length=model.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return model.text_encoder(tokens.input_ids)[0]


@torch.no_grad()
def seesr_loop(model, folder: Path, sampler: str, lr_image: torch.Tensor, seed: int):
    """SeeSR's pipeline call on one LR image → (x_T and every step's latent, SR image)."""
    scheduler_cls = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
    scheduler = scheduler_cls.from_pretrained(folder / "scheduler")
    generator = torch.Generator().manual_seed(seed)
    vae = model.vae
    # test_seesr.py: the tags and embeddings of the LR image, and its prompt
    tags, ram_embeds = model.tag(lr_image)
    prompt = f"{tags[0]}, {USER_PROMPT}," + ADDED
    # 3. encode the prompt: [negative; positive] and [ram; ram]
    prompt_embeds = torch.cat([encode_text(model, NEGATIVE), encode_text(model, prompt)])
    ram = torch.cat([ram_embeds, ram_embeds])
    # 4. the ControlNet image: the LR upsampled to HR size in [0, 1], doubled for guidance
    control = F.interpolate(lr_image, scale_factor=4, mode="bicubic", align_corners=False)
    image = torch.cat([control.clamp(0, 1)] * 2)
    # 5. timesteps
    scheduler.set_timesteps(STEPS)
    # 6. noise latents, then the LR latent noised to start_steps
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (1, model.unet.config.in_channels, image.shape[-2] // factor, image.shape[-1] // factor)
    noise = randn_tensor(shape, generator=generator) * scheduler.init_noise_sigma
    posterior = vae.encode(image[:1] * 2 - 1).latent_dist  # SeeSR: image*2-1, row 0 kept
    lr_latent = posterior.sample(generator) * vae.config.scaling_factor
    start = torch.full((1,), START_STEPS, dtype=torch.long)
    latents = scheduler.add_noise(lr_latent[0:1], noise, start)
    trajectory = [latents]
    # 8. the denoising loop
    for t in scheduler.timesteps:
        if t > START_STEPS:
            continue
        latent_model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        down, mid = model.controlnet(
            latent_model_input,
            t,
            encoder_hidden_states=prompt_embeds,
            controlnet_cond=image,
            conditioning_scale=1.0,
            guess_mode=False,
            return_dict=False,
            image_encoder_hidden_states=ram,
        )
        noise_pred = model.unet(
            latent_model_input,
            t,
            encoder_hidden_states=prompt_embeds,
            cross_attention_kwargs=None,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
            image_encoder_hidden_states=ram,
        )[0]
        uncond, text = noise_pred.chunk(2)
        noise_pred = uncond + GUIDANCE * (text - uncond)
        extra = {"generator": generator} | ({"eta": 0.0} if sampler == "ddim" else {})
        latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
        trajectory.append(latents)
    decoded = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    return trajectory, (decoded / 2 + 0.5).clamp(0, 1)


def our_sampling(model, lr_image: torch.Tensor, seed: int, monkeypatch):
    """`model.sample` → (x_T and every step's latent, SR image), recorded on the way."""
    trajectory: list[torch.Tensor] = []
    start_latent, sampler_step = model.start_latent, model.sampler_step

    def recorded(call):
        def wrapper(*args, **kwargs):
            latent = call(*args, **kwargs)
            trajectory.append(latent.clone())
            return latent

        return wrapper

    monkeypatch.setattr(model, "start_latent", recorded(start_latent))
    monkeypatch.setattr(model, "sampler_step", recorded(sampler_step))
    sr_image = model.sample(lr_image, STEPS, torch.Generator().manual_seed(seed))
    return trajectory, sr_image


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampler_follows_seesr_pipeline_step_for_step(seesr_folder, sampler, monkeypatch):
    model = tiny_seesr(seesr_folder, sampler)
    lr_image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    ours, sr_image = our_sampling(model, lr_image, seed=7, monkeypatch=monkeypatch)
    theirs, seesr_image = seesr_loop(model, seesr_folder, sampler, lr_image, seed=7)
    assert len(ours) == len(theirs) == STEPS + 1
    for index, (mine, reference) in enumerate(zip(ours, theirs, strict=True)):
        difference = (mine - reference).abs().max().item()
        assert difference <= ATOL, f"latent {index} (0 = x_T) differs by {difference}"
    assert sr_image.shape == seesr_image.shape == (1, 3, 32, 32)
    assert (sr_image - seesr_image).abs().max().item() <= ATOL
    # Not vacuous: the steps move the latent, and DDPM's per-step noise comes from the generator.
    assert (theirs[-1] - theirs[0]).abs().max().item() > 0.1
