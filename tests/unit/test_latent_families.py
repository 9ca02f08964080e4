"""The sd_upscaler and controlnet_sr families on tiny random components (diffusers' test sizes),
saved with save_pretrained and loaded through the same code path as real weights."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionUpscalePipeline,
)

from rfsr_ray.config import build_config
from rfsr_ray.errors import ConfigError, WeightsError
from rfsr_ray.models import build_model, load_model
from rfsr_ray.train.step import Batch, autocast_for, build_state, optimizer_step, rfsr_loss
from tests.unit.helpers import latent_config, pair, seeded

LORA = {"finetune": "lora", "lora": {"enabled": True, "rank": 4}}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ------------------------------------------------------------------------------ faithfulness
def test_sd_upscaler_samples_like_the_diffusers_pipeline(folders):
    prompt = {"text": "a photo", "negative": "blurry", "guidance_scale": 3.0}
    cfg = latent_config(folders, "sd_upscaler", prompt=prompt, sd_upscaler={"noise_level": 30})
    model = build_model(cfg.model, 4, trainable=False)
    assert model.scheduler.config.prediction_type == "v_prediction"
    lr, _ = pair()
    ours = model.sample(lr, 5, seeded())
    pipeline = StableDiffusionUpscalePipeline.from_pretrained(folders["sd_upscaler"])
    theirs = pipeline(
        prompt=["a photo"] * 2,
        negative_prompt=["blurry"] * 2,
        image=lr,
        num_inference_steps=5,
        guidance_scale=3.0,
        noise_level=30,
        generator=seeded(),
        output_type="pt",
    ).images
    assert ours.shape == (2, 3, 32, 32)
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("start", ["noise", "lr_latent"])
def test_controlnet_sr_samples_like_the_diffusers_pipeline(folders, start):
    # img2img at strength 1 noises the LR latent to the first inference timestep, which is
    # `lr_latent_timestep: first_inference`; the default (T-1, SeeSR's) differs from it there.
    controlnet_sr = {"start": start, "lr_latent_timestep": "first_inference"}
    cfg = latent_config(
        folders, "controlnet_sr", controlnet_sr=controlnet_sr, prompt={"guidance_scale": 2.0}
    )
    model = build_model(cfg.model, 4, trainable=False)
    lr, _ = pair()
    control = F.interpolate(lr, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    ours = model.sample(lr, 4, seeded())
    kwargs = {
        "prompt": [""] * 2,
        "height": 32,
        "width": 32,
        "num_inference_steps": 4,
        "guidance_scale": 2.0,
        "controlnet_conditioning_scale": 1.0,  # img2img's default is 0.8
        "generator": seeded(),
        "output_type": "pt",
    }
    if start == "noise":
        pipeline = StableDiffusionControlNetPipeline.from_pretrained(folders["controlnet_sr"])
        theirs = pipeline(image=control, **kwargs).images
    else:  # img2img at strength 1: the LR latent noised to the first inference timestep
        pipeline = StableDiffusionControlNetImg2ImgPipeline.from_pretrained(
            folders["controlnet_sr"]
        )
        theirs = pipeline(image=control, control_image=control, strength=1.0, **kwargs).images
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_x0_honours_v_prediction(folders):
    """At the last step x̂0 must be close to what one more DDIM step reaches, which only holds
    when x̂0 is computed in the model's own parameterisation (v, not ε)."""
    model = build_model(latent_config(folders, "sd_upscaler").model, 4, trainable=False)
    lr, _ = pair()
    condition = model.condition(lr, seeded())
    timesteps = model.set_timesteps(4)
    latent = model.start_latent(condition, seeded(1))
    with torch.no_grad():
        x0 = model.predict_x0(latent, timesteps[0], condition)
        output = model.model_output(latent, timesteps[0], condition)
    ddim_x0 = model.scheduler.step(output, timesteps[0], latent).pred_original_sample
    assert torch.allclose(x0, ddim_x0, atol=1e-5)


# ---------------------------------------------------------------------------------------- training
def grads_of(model) -> dict[str, torch.Tensor]:
    return {
        f"{part}.{name}": p.grad
        for part, module in model.components().items()
        for name, p in module.named_parameters()
        if p.grad is not None
    }


@pytest.mark.parametrize(
    ("family", "extra", "expect"),
    [
        ("sd_upscaler", {}, {"unet."}),
        ("sd_upscaler", {"finetune": "unet_attention"}, {"unet."}),
        ("controlnet_sr", {}, {"unet.", "controlnet."}),
        ("controlnet_sr", {"finetune": "controlnet"}, {"controlnet."}),
        ("sd_upscaler", LORA, {"unet."}),
        ("controlnet_sr", {**LORA, "lora": {"enabled": True, "apply_to": ["controlnet"]}}, None),
    ],
)
def test_rfsr_step_gradients_reach_only_what_trains(folders, family, extra, expect):
    cfg = latent_config(folders, family, **extra)
    model = build_model(cfg.model, 4)
    state = build_state(cfg, model, torch.device("cpu"))
    lr, hr = pair()
    output = rfsr_loss(model, state.losses, Batch(lr, hr), 2, cfg, seeded())
    output.loss.backward()
    grads = grads_of(model)
    assert grads, "no gradient reached the model"
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0
    assert not any(k.startswith(("vae.", "text_encoder.")) for k in grads)
    if cfg.model.lora.enabled:
        assert all("lora_" in k for k in grads), [k for k in grads if "lora_" not in k][:3]
        assert not len(model.reference)  # no second copy: adapters off is the reference
        parts = set(cfg.model.lora.apply_to)
        assert {k.split(".")[0] for k in grads} == parts
    else:
        assert {k.split(".")[0] + "." for k in grads} == expect
    if extra.get("finetune") == "unet_attention":
        assert all(".attentions." in k for k in grads)


@pytest.mark.parametrize(("family", "extra"), [("sd_upscaler", LORA), ("controlnet_sr", {})])
def test_frozen_reference_stays_the_original_model(folders, family, extra):
    cfg = latent_config(folders, family, **extra)
    model = build_model(cfg.model, 4)
    original = build_model(latent_config(folders, family).model, 4, trainable=False)
    state = build_state(cfg, model, torch.device("cpu"))
    lr, hr = pair()
    condition = model.condition(lr, seeded())
    timesteps = model.set_timesteps(4)
    latent = model.start_latent(condition, seeded(1))

    def x0(m, reference: bool) -> torch.Tensor:
        with torch.no_grad():
            return m.predict_x0(latent, timesteps[2], condition, reference=reference)

    before = x0(model, reference=True)
    assert torch.equal(before, x0(original, reference=False))
    for _ in range(3):
        optimizer_step(state, [Batch(lr, hr)], cfg)
    assert torch.equal(x0(model, reference=True), before)  # reference unchanged
    assert not torch.allclose(x0(model, reference=False), before)  # the trained model moved
    if cfg.model.lora.enabled:  # adapters are back on after the reference pass
        assert all(m.lora_A["rfsr"].weight.requires_grad for m in lora_layers(model.unet))


def lora_layers(module):
    return [m for m in module.modules() if hasattr(m, "lora_A") and "rfsr" in m.lora_A]


def test_gradient_checkpointing_gives_the_same_gradients(folders, monkeypatch):
    """Checkpointing is on exactly when configured (the UNet, ControlNet and VAE say so and
    their forward goes through torch's checkpoint) and leaves the gradients unchanged."""
    from torch.utils import checkpoint

    calls = []
    original = checkpoint.checkpoint
    monkeypatch.setattr(
        checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k)
    )  # diffusers looks it up on each call
    lr, hr = pair()
    grads = []
    for checkpointing in (False, True):
        cfg = latent_config(
            folders, "controlnet_sr", memory={"gradient_checkpointing": checkpointing}
        )
        model = build_model(cfg.model, 4)
        model.train()
        parts = (model.unet, model.controlnet, model.vae)
        assert [m.is_gradient_checkpointing for m in parts] == [checkpointing] * 3
        state = build_state(cfg, model, torch.device("cpu"))
        calls.clear()
        rfsr_loss(model, state.losses, Batch(lr, hr), 3, cfg, seeded()).loss.backward()
        assert bool(calls) == checkpointing, len(calls)
        grads.append(torch.cat([p.grad.flatten() for p in state.params]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_prompt_dropout_is_seeded_and_per_sample(folders):
    cfg = latent_config(folders, "sd_upscaler", prompt={"text": "sharp photo", "drop_prob": 0.5})
    model = build_model(cfg.model, 4, trainable=False)
    lr = torch.rand(8, 3, 8, 8)
    first = model.condition(lr, seeded(3), mode="train").prompt_embeds
    again = model.condition(lr, seeded(3), mode="train").prompt_embeds
    assert torch.equal(first, again)
    empty, text = model.encode_prompts([""])[0], model.encode_prompts(["sharp photo"])[0]
    kinds = {("empty" if torch.equal(e, empty) else "text" if torch.equal(e, text) else "?")
             for e in first}  # fmt: skip
    assert kinds == {"empty", "text"}


# ---------------------------------------------------------------------------------------- export
def train_a_little(cfg):
    model = build_model(cfg.model, 4)
    state = build_state(cfg, model, torch.device("cpu"))
    lr, hr = pair()
    for _ in range(2):
        optimizer_step(state, [Batch(lr, hr)], cfg)
    return model


@pytest.mark.parametrize(
    ("family", "extra"),
    [
        ("sd_upscaler", {}),
        ("sd_upscaler", LORA),
        ("sd_upscaler", {**LORA, "lora": {"enabled": True, "merge_on_export": True}}),
        ("controlnet_sr", {**LORA, "lora": {"enabled": True, "apply_to": ["unet", "controlnet"]}}),
        ("controlnet_sr", {"finetune": "controlnet"}),
    ],
)
def test_export_reloads_and_runs_in_the_plain_pipeline(folders, tmp_path, family, extra):
    cfg = latent_config(folders, family, **extra)
    model = train_a_little(cfg)
    export = model.save(tmp_path / "export")
    lr, _ = pair()
    expected = model.sample(lr, 4, seeded())
    assert torch.allclose(load_model(export).sample(lr, 4, seeded()), expected, atol=1e-5)
    lora_only = cfg.model.lora.enabled and not cfg.model.lora.merge_on_export
    pipeline_cls = (
        StableDiffusionUpscalePipeline
        if family == "sd_upscaler"
        else StableDiffusionControlNetPipeline
    )
    if lora_only:  # adapters on the base: what `load_lora_weights` users do
        pipeline = pipeline_cls.from_pretrained(folders[family])
        if (export / "pytorch_lora_weights.safetensors").is_file():
            pipeline.load_lora_weights(export)
        if (export / "controlnet_lora").is_dir():
            pipeline.controlnet.load_lora_adapter(
                str(export / "controlnet_lora"), weight_name="pytorch_lora_weights.safetensors"
            )
    else:
        pipeline = pipeline_cls.from_pretrained(export)
    kwargs = {"prompt": [""] * 2, "num_inference_steps": 4, "generator": seeded()}
    if family == "sd_upscaler":
        images = pipeline(image=lr, noise_level=20, **kwargs, output_type="pt").images
    else:
        control = F.interpolate(lr, size=(32, 32), mode="bicubic", align_corners=False)
        control = control.clamp(0, 1)
        images = pipeline(image=control, guidance_scale=1.0, **kwargs, output_type="pt").images
    assert (images - expected).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------------------- errors
def test_missing_folder_and_uncached_hub_id_fail_fast(folders, tmp_path, monkeypatch):
    started = time.monotonic()
    with pytest.raises(WeightsError, match="no such folder"):
        build_model(
            latent_config(folders, "sd_upscaler", pretrained=str(tmp_path / "nope")).model, 4
        )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_cfg = build_config({"model": {"family": "sd_upscaler"}})  # the default hub id
    with pytest.raises(WeightsError) as offline:
        build_model(hub_cfg.model, 4)
    message = str(offline.value)
    for needed in ("stabilityai/stable-diffusion-x4-upscaler", "HF_HOME", "--local-dir"):
        assert needed in message
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(WeightsError, match="cannot be reached"):
        build_model(hub_cfg.model, 4)
    assert time.monotonic() - started < 20


def test_incomplete_folder_names_the_missing_component(folders, tmp_path):
    import shutil

    broken = shutil.copytree(folders["controlnet_sr"], tmp_path / "broken")
    shutil.rmtree(broken / "controlnet")
    with pytest.raises(WeightsError, match=r"model\.controlnet_sr\.controlnet"):
        build_model(latent_config(folders, "controlnet_sr", pretrained=str(broken)).model, 4)
    shutil.rmtree(broken / "vae")
    cfg = latent_config(folders, "controlnet_sr", pretrained=str(broken))
    cfg = cfg.model.model_copy(
        update={"controlnet_sr": cfg.model.controlnet_sr.model_copy(
            update={"controlnet": str(folders["controlnet_sr"] / "controlnet")})}
    )  # fmt: skip
    with pytest.raises(WeightsError, match="no vae/ folder"):
        build_model(cfg, 4)


@pytest.mark.parametrize(
    ("model", "match"),
    [
        ({"family": "sd_upscaler", "finetune": "controlnet"}, "not available for family"),
        ({"family": "sd_upscaler", "finetune": "lora"}, "go together"),
        ({"family": "controlnet_sr"}, "needs model.pretrained"),
        ({"family": "sd_upscaler", "sampler": "ddpm", "lora": {"enabled": True}}, "go together"),
    ],
)
def test_model_config_errors_name_the_fix(model, match):
    with pytest.raises(ConfigError, match=match):
        build_config({"model": model})


def test_training_batches_carry_captions_as_prompts_with_the_fixed_text_as_fallback():
    import numpy as np

    from rfsr_ray.train.loop import _batches

    class Shard:
        def iter_batches(self, **kwargs):
            yield {
                "lr": np.zeros((2, 8, 8, 3), np.uint8),
                "hr": np.zeros((2, 32, 32, 3), np.uint8),
                "epoch": np.array([0, 0]),
                "caption": np.array(["a red car", ""], dtype=object),
            }

    cfg = build_config({"model": {"prompt": {"text": "a photo", "from_data": True}}})
    batch, epoch = next(_batches(Shard(), cfg, torch.device("cpu"), rank=0))
    assert batch.prompts == ["a red car", "a photo"] and epoch == 0
    assert batch.lr_image.shape == (2, 3, 8, 8) and batch.lr_image.dtype == torch.float32


# ---------------------------------------------------------------------------------------- GPU tier
MEMORY_SAVING = {"gradient_checkpointing": True, "channels_last": True}
LORA_BOTH = {**LORA, "lora": {"enabled": True, "apply_to": ["unet", "controlnet"]}}


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(
    ("family", "extra", "precision"),
    [
        ("sd_upscaler", {"memory": {"gradient_checkpointing": True}}, "bf16"),
        ("sd_upscaler", LORA, "fp16"),
        ("controlnet_sr", {"memory": MEMORY_SAVING}, "bf16"),
        ("controlnet_sr", LORA_BOTH, "fp16"),
    ],
)
def test_mixed_precision_steps_on_a_gpu_update_fp32_weights(folders, family, extra, precision):
    """bf16/fp16 autocast on CUDA (fp16 with loss scaling): the steps are finite and move the
    trained weights, which stay fp32 master weights on the GPU."""
    cfg = latent_config(folders, family, train={"mixed_precision": precision}, **extra)
    device = torch.device("cuda")
    model = build_model(cfg.model, 4).to(device)
    state = build_state(cfg, model, device)
    assert (state.scaler is not None) == (precision == "fp16")
    lr, hr = (image.to(device) for image in pair())
    before = [p.detach().clone() for p in state.params]
    autocast = autocast_for(precision, device)
    results = [optimizer_step(state, [Batch(lr, hr)], cfg, autocast) for _ in range(4)]
    assert not all(r.skipped for r in results), [r.terms for r in results]
    assert all(torch.isfinite(torch.tensor(r.terms["loss"])) for r in results if not r.skipped)
    assert all(p.dtype == torch.float32 and p.is_cuda for p in state.params)
    assert any(not torch.equal(b, p) for b, p in zip(before, state.params, strict=True))


@pytest.mark.gpu
@cuda
def test_sd_upscaler_samples_like_the_diffusers_pipeline_on_a_gpu(folders):
    cfg = latent_config(folders, "sd_upscaler", prompt={"guidance_scale": 2.0})
    model = build_model(cfg.model, 4, trainable=False).to("cuda")
    lr = pair()[0].cuda()
    ours = model.sample(lr, 4, torch.Generator("cuda").manual_seed(0))
    pipeline = StableDiffusionUpscalePipeline.from_pretrained(folders["sd_upscaler"]).to("cuda")
    theirs = pipeline(
        prompt=[""] * 2,
        image=lr,
        num_inference_steps=4,
        guidance_scale=2.0,
        noise_level=cfg.model.sd_upscaler.noise_level,
        generator=torch.Generator("cuda").manual_seed(0),
        output_type="pt",
    ).images
    # GPU kernels may pick other algorithms per call (TF32 convolutions), so 1e-3, not 1e-4.
    assert (ours.cpu() - theirs.cpu()).abs().max().item() <= 1e-3
