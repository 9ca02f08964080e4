"""Memory options of the latent families on tiny components: 8-bit AdamW, EMA weights on the
CPU, freeing the text encoder, and a Gram reference that copies only the trained tensors."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from rfsr_ray.config import TrainConfig
from rfsr_ray.errors import ConfigError
from rfsr_ray.models import build_model, load_model
from rfsr_ray.train.checkpoint import Progress, load_checkpoint, save_checkpoint
from rfsr_ray.train.step import (
    Batch,
    CPUShadowEMA,
    build_ema,
    build_optimizer,
    build_state,
    optimizer_step,
)
from tests.unit.helpers import latent_config, pair, seeded

try:
    import bitsandbytes  # noqa: F401
except ImportError:
    HAS_BNB = False
else:
    HAS_BNB = True
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="train.optimizer=adamw_8bit needs bitsandbytes")


# ----------------------------------------------------------------------------- 8-bit AdamW
@needs_bnb
@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_adamw_keeps_uint8_state_steps_and_round_trips(name):
    weight = torch.nn.Parameter(torch.randn(64, 128, generator=seeded()))  # ≥ 4096: 8-bit state
    optimizer, _ = build_optimizer([weight], TrainConfig(optimizer=name, lr=1e-2))
    assert type(optimizer).__module__.startswith("bitsandbytes")
    before = weight.detach().clone()
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    moved = (weight.detach() - before).abs()
    assert 0 < moved.max() < 0.05  # about lr per element, Adam's first step
    state = optimizer.state[weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    # A resumed optimiser continues exactly where the saved one was.
    twin = torch.nn.Parameter(weight.detach().clone())
    resumed, _ = build_optimizer([twin], TrainConfig(optimizer=name, lr=1e-2))
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    gradient = torch.randn_like(weight)
    weight.grad, twin.grad = gradient.clone(), gradient.clone()
    optimizer.step()
    resumed.step()
    assert torch.equal(weight, twin)


def test_missing_bitsandbytes_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    weight = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ConfigError, match=r"train.optimizer=adamw_8bit needs bitsandbytes.*pip"):
        build_optimizer([weight], TrainConfig(optimizer="adamw_8bit"))
    optimizer, _ = build_optimizer([weight], TrainConfig(optimizer="adamw"))
    assert type(optimizer) is torch.optim.AdamW


# ------------------------------------------------------------------------------ EMA on CPU
@pytest.mark.parametrize("schedule", ["constant", "ramp"])
def test_ema_on_cpu_matches_the_device_ema_and_stays_on_the_cpu(schedule):
    weights = [torch.nn.Parameter(torch.randn(8, 8, generator=seeded(i))) for i in range(2)]
    on_cpu = build_ema(weights, TrainConfig(ema_on_cpu=True, ema_schedule=schedule, ema_decay=0.9))
    plain = build_ema(weights, TrainConfig(ema_schedule=schedule, ema_decay=0.9))
    assert isinstance(on_cpu, CPUShadowEMA) and not isinstance(plain, CPUShadowEMA)
    on_cpu.to(torch.device("meta"))  # what build_state does with the training device
    assert all(s.device.type == "cpu" for s in on_cpu.shadow_params)
    assert all(
        s.data_ptr() != w.data_ptr() for s, w in zip(on_cpu.shadow_params, weights, strict=True)
    )
    for step in range(3):
        with torch.no_grad():
            for weight in weights:
                weight.add_(torch.randn(8, 8, generator=seeded(10 + step)))
        on_cpu.step(weights)
        plain.step(weights)
    for ours, theirs in zip(on_cpu.shadow_params, plain.shadow_params, strict=True):
        assert torch.equal(ours, theirs)
    assert on_cpu.cur_decay_value == plain.cur_decay_value


@needs_bnb
def test_ema_on_cpu_checkpoint_round_trips(folders, tmp_path):
    cfg = latent_config(
        folders, "sd_upscaler", train={"ema_on_cpu": True, "optimizer": "adamw_8bit"}
    )
    lr, hr = pair()
    model = build_model(cfg.model, 4)
    state = build_state(cfg, model, torch.device("cpu"))
    optimizer_step(state, [Batch(lr, hr)], cfg)
    folder = save_checkpoint(tmp_path / "checkpoint", state, Progress(), cfg)
    saved_shadow = [s.clone() for s in state.ema.shadow_params]
    optimizer_step(state, [Batch(lr, hr)], cfg)
    after_two = [p.detach().clone() for p in state.params]
    fresh = build_state(cfg, build_model(cfg.model, 4), torch.device("cpu"))
    load_checkpoint(folder, fresh)
    assert isinstance(fresh.ema, CPUShadowEMA)
    for ours, theirs in zip(fresh.ema.shadow_params, saved_shadow, strict=True):
        assert ours.device.type == "cpu" and torch.equal(ours, theirs)
    optimizer_step(fresh, [Batch(lr, hr)], cfg)  # the same second step, 8-bit state included
    for ours, theirs in zip(fresh.params, after_two, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-6)


# ----------------------------------------------------------------------- free text encoder
PROMPT = {"text": "a sharp photo", "negative": "blurry", "guidance_scale": 3.0, "drop_prob": 0.5}


def test_free_text_encoder_drops_it_and_keeps_identical_embeddings(folders, tmp_path):
    kept = build_model(latent_config(folders, "controlnet_sr", prompt=PROMPT).model, 4)
    cfg = latent_config(folders, "controlnet_sr", prompt=PROMPT, memory={"free_text_encoder": True})
    freed = build_model(cfg.model, 4)
    assert freed.text_encoder is None and "text_encoder" not in freed.components()
    assert not any("text_encoder" in name for name, _ in freed.named_parameters())
    texts = ["a sharp photo", "", "blurry", "a sharp photo"]
    assert torch.equal(freed.encode_prompts(texts), kept.encode_prompts(texts))
    lr, _ = pair()
    for mode in ("train", "sample"):
        ours = freed.condition(lr, seeded(), mode=mode).prompt_embeds
        assert torch.equal(ours, kept.condition(lr, seeded(), mode=mode).prompt_embeds)
    with pytest.raises(ConfigError, match="free_text_encoder=false"):
        freed.encode_prompts(["another prompt"])
    # A full export is complete: the frozen encoder comes back from model.pretrained.
    export = freed.save(tmp_path / "export")
    assert freed.text_encoder is None and (export / "text_encoder").is_dir()
    assert torch.allclose(load_model(export).sample(lr, 4, seeded()), freed.sample(lr, 4, seeded()))


# ------------------------------------------------------------------ reduced reference copy
def parameter_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize(
    ("family", "finetune"),
    [("controlnet_sr", "controlnet+unet_attention"), ("sd_upscaler", "unet_attention")],
)
def test_reference_copies_only_trained_tensors_and_predicts_as_the_original(
    folders, family, finetune
):
    cfg = latent_config(folders, family, finetune=finetune)
    model = build_model(cfg.model, 4)
    original = copy.deepcopy(model)  # what the reference must keep computing
    trained = model.trainable_parameters()
    frozen_copy = [t for r in model.reference.values() for t in r.buffers()]
    assert parameter_bytes(frozen_copy) == parameter_bytes(trained)
    unet_copy = parameter_bytes(model.reference["unet"].buffers())
    assert 0 < unet_copy < parameter_bytes(model.unet.parameters())  # its attention blocks only
    state = build_state(cfg, model, torch.device("cpu"))
    lr, hr = pair()
    for _ in range(2):
        optimizer_step(state, [Batch(lr, hr)], cfg)
    condition = model.condition(lr, seeded())
    timesteps = model.set_timesteps(4)
    latent = model.start_latent(condition, seeded(1))
    # The gradient forward, then the reference forward, then backward: the reference pass must
    # neither change the gradient nor leave the original tensors in place.
    model.zero_grad(set_to_none=True)
    output = model.predict_x0(latent, timesteps[2], condition)
    with torch.no_grad():
        reference = model.predict_x0(latent, timesteps[2], condition, reference=True)
        expected = original.predict_x0(latent, timesteps[2], condition, reference=False)
    assert torch.equal(reference, expected)
    output.square().mean().backward()
    with_reference = [p.grad.clone() for p in trained]
    model.zero_grad()
    model.predict_x0(latent, timesteps[2], condition).square().mean().backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(with_reference, trained, strict=True))
    with torch.no_grad():
        trained_now = model.predict_x0(latent, timesteps[2], condition)
    assert not torch.allclose(trained_now, expected)  # the trained weights are back in place
