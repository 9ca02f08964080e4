"""SeeSR's UNet and ControlNet on diffusers' classes, checked against SeeSR's own classes: their
released-size state-dict keys and shapes, and the outputs of a small pair with seeded weights
(tests/fixtures/seesr_state_keys.json, written by tests/fixtures/make_seesr_fixtures.py)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from rfsr_ray.errors import WeightsError
from rfsr_ray.models.seesr import (
    SeeSRControlNet,
    SeeSRUNet,
    load_seesr_controlnet,
    load_seesr_unet,
)
from rfsr_ray.models.seesr.unet import image_attentions_of
from tests.fixtures.make_seesr_fixtures import run_pair, seeded_weights, shapes, tiny_inputs

FIXTURE = json.loads((Path(__file__).parents[1] / "fixtures" / "seesr_state_keys.json").read_text())
TINY = FIXTURE["tiny"]
SEESR_KEYS = ("use_image_cross_attention", "image_cross_attention_dim")
WEIGHTS = "diffusion_pytorch_model.safetensors"


def tiny_pair(seed: int = 0) -> tuple[SeeSRUNet, SeeSRControlNet]:
    """The fixture's small SeeSR UNet and its ControlNet (from_unet), seeded weights, eval."""
    torch.manual_seed(seed)
    unet = SeeSRUNet.from_config(TINY["unet_config"])
    unet.load_state_dict(seeded_weights(shapes(unet)))
    channels = TINY["conditioning_embedding_out_channels"]
    controlnet = SeeSRControlNet.from_unet(unet, conditioning_embedding_out_channels=channels)
    controlnet.load_state_dict(seeded_weights(shapes(controlnet)))
    return unet.eval(), controlnet.eval()


def image_attentions(model: torch.nn.Module) -> list[torch.nn.Module]:
    blocks = [*model.down_blocks, model.mid_block, *getattr(model, "up_blocks", [])]
    return image_attentions_of(blocks)


def zero_image_projections(model: torch.nn.Module) -> None:
    """Zero every image attention's output projection: the image attention is then the identity."""
    for attention in image_attentions(model):
        torch.nn.init.zeros_(attention.proj_out.weight)
        torch.nn.init.zeros_(attention.proj_out.bias)


def plain_copy(model: torch.nn.Module, plain_class: type) -> torch.nn.Module:
    """diffusers' own class from `model`'s config, holding its weights (all but image attention)."""
    config = {k: v for k, v in model.config.items() if k not in SEESR_KEYS}
    plain = plain_class.from_config(config)
    state = {k: v for k, v in model.state_dict().items() if ".image_attentions." not in k}
    plain.load_state_dict(state)
    return plain.eval()


@torch.no_grad()
def test_outputs_equal_seesr_own_classes():
    unet, controlnet = tiny_pair()
    outputs = run_pair(unet, controlnet, tiny_inputs(unet.config.image_cross_attention_dim))
    for name, value in outputs.items():
        expected = torch.tensor(TINY["outputs"][name]).view(value.shape)
        torch.testing.assert_close(value, expected, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("name", ["unet", "controlnet"])
def test_released_size_keys_and_shapes_match_seesr(name):
    with torch.device("meta"):
        unet = SeeSRUNet.from_config(FIXTURE["unet_config"])
        model = (
            unet
            if name == "unet"
            else SeeSRControlNet.from_unet(unet, load_weights_from_unet=False)
        )
    assert shapes(model) == FIXTURE[name]
    assert sum(".image_attentions." in k for k in shapes(model)) > 0


def test_controlnet_config_matches_seesr():
    with torch.device("meta"):
        controlnet = SeeSRControlNet.from_unet(SeeSRUNet.from_config(FIXTURE["unet_config"]))
    config = json.loads(json.dumps({k: controlnet.config[k] for k in FIXTURE["controlnet_config"]}))
    assert config == FIXTURE["controlnet_config"]


@torch.no_grad()
def test_save_and_reload_give_identical_outputs(tmp_path):
    unet, controlnet = tiny_pair()
    unet.save_pretrained(tmp_path / "unet")
    controlnet.save_pretrained(tmp_path / "controlnet")
    saved = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert saved["use_image_cross_attention"] is True
    reloaded = (
        SeeSRUNet.from_pretrained(tmp_path / "unet").eval(),
        SeeSRControlNet.from_pretrained(tmp_path / "controlnet").eval(),
    )
    inputs = tiny_inputs(unet.config.image_cross_attention_dim)
    before, after = run_pair(unet, controlnet, inputs), run_pair(*reloaded, inputs)
    for name in before:
        assert torch.equal(before[name], after[name]), name


@torch.no_grad()
def test_unet_with_zero_image_projections_is_diffusers_unet():
    unet, _ = tiny_pair()
    plain = plain_copy(unet, UNet2DConditionModel)
    inputs = tiny_inputs(unet.config.image_cross_attention_dim)
    args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    image = inputs["image_encoder_hidden_states"]
    expected = plain(*args).sample
    assert (unet(*args, image_encoder_hidden_states=image).sample - expected).abs().max() > 1e-3
    zero_image_projections(unet)
    delta = (unet(*args, image_encoder_hidden_states=image).sample - expected).abs().max()
    assert delta <= 1e-5


@torch.no_grad()
def test_controlnet_with_zero_image_projections_is_diffusers_controlnet():
    _, controlnet = tiny_pair()
    plain = plain_copy(controlnet, ControlNetModel)
    inputs = tiny_inputs(controlnet.config.image_cross_attention_dim)
    args = [inputs[k] for k in ("sample", "timestep", "encoder_hidden_states", "controlnet_cond")]
    image = inputs["image_encoder_hidden_states"]

    def delta() -> float:
        ours = controlnet(*args, image_encoder_hidden_states=image, return_dict=False)
        theirs = plain(*args, return_dict=False)
        pairs = [*zip(ours[0], theirs[0], strict=True), (ours[1], theirs[1])]
        return max((a - b).abs().max().item() for a, b in pairs)

    assert delta() > 1e-3
    zero_image_projections(controlnet)
    assert delta() <= 1e-5


def test_from_unet_copies_image_attention():
    unet, _ = tiny_pair()
    controlnet = SeeSRControlNet.from_unet(unet, conditioning_embedding_out_channels=(4, 8))
    assert controlnet.config.use_image_cross_attention is True
    ours = controlnet.state_dict()
    copied = [k for k in ours if ".image_attentions." in k]
    assert copied and all(torch.equal(ours[k], unet.state_dict()[k]) for k in copied)
    plain = SeeSRControlNet.from_unet(
        plain_copy(unet, UNet2DConditionModel), conditioning_embedding_out_channels=(4, 8)
    )
    assert plain.config.use_image_cross_attention is False and not image_attentions(plain)


@torch.no_grad()
def test_a_deep_copy_runs_its_own_image_attention():
    unet, _ = tiny_pair()
    inputs = tiny_inputs(unet.config.image_cross_attention_dim)
    args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    image = inputs["image_encoder_hidden_states"]
    before = unet(*args, image_encoder_hidden_states=image).sample
    twin = copy.deepcopy(unet)
    zero_image_projections(twin)
    assert torch.equal(unet(*args, image_encoder_hidden_states=image).sample, before)
    assert not torch.equal(twin(*args, image_encoder_hidden_states=image).sample, before)


def test_gradients_reach_image_attention_under_gradient_checkpointing():
    unet, controlnet = tiny_pair()
    for model in (unet, controlnet):
        model.train().enable_gradient_checkpointing()
    outputs = run_pair(unet, controlnet, tiny_inputs(unet.config.image_cross_attention_dim))
    outputs["unet_sample"].square().mean().backward()
    for model in (unet, controlnet):
        grads = [a.proj_out.weight.grad for a in image_attentions(model)]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_image_embeddings_are_required_and_checked():
    unet, _ = tiny_pair()
    inputs = tiny_inputs(unet.config.image_cross_attention_dim)
    args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    with pytest.raises(ValueError, match=r"pass image_encoder_hidden_states, \(B, N, 512\)"):
        unet(*args)
    with pytest.raises(ValueError, match=r"shape \(1, 5, 512\); expected \(2, N, 512\)"):
        unet(*args, image_encoder_hidden_states=inputs["image_encoder_hidden_states"][:1])
    plain = SeeSRUNet.from_config({**unet.config, "use_image_cross_attention": False})
    with pytest.raises(ValueError, match="has no image attention"):
        plain(*args, image_encoder_hidden_states=inputs["image_encoder_hidden_states"])


def test_strict_loaders_load_a_complete_folder(tmp_path):
    unet, controlnet = tiny_pair()
    unet.save_pretrained(tmp_path / "unet")
    controlnet.save_pretrained(tmp_path / "controlnet")
    loaded_unet = load_seesr_unet(tmp_path / "unet")
    loaded_controlnet = load_seesr_controlnet(tmp_path / "controlnet")
    for ours, loaded in ((unet, loaded_unet), (controlnet, loaded_controlnet)):
        state = loaded.state_dict()
        assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("change", ["missing", "unexpected"])
@pytest.mark.parametrize("part", ["unet", "controlnet"])
def test_strict_loaders_name_missing_and_unexpected_keys(tmp_path, part, change):
    model = dict(zip(("unet", "controlnet"), tiny_pair(), strict=True))[part]
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / WEIGHTS)
    key = sorted(k for k in state if ".image_attentions." in k)[0]
    if change == "missing":
        del state[key]
    else:
        key = "down_blocks.0.extra.weight"
        state[key] = torch.zeros(3)
    save_file(state, tmp_path / WEIGHTS)
    load = load_seesr_unet if part == "unet" else load_seesr_controlnet
    counted = "1 parameter(s) missing" if change == "missing" else "1 unexpected key(s)"
    named = re.escape(f"{counted} (e.g. ['{key}'])") + f".*`{part}/` folder"
    with pytest.raises(WeightsError, match=named):
        load(tmp_path)


def test_strict_loader_refuses_a_plain_or_wrong_folder(tmp_path):
    unet, controlnet = tiny_pair()
    plain_copy(unet, UNet2DConditionModel).save_pretrained(tmp_path / "plain")
    with pytest.raises(WeightsError, match=r"use_image_cross_attention is None.*`unet/` folder"):
        load_seesr_unet(tmp_path / "plain")
    controlnet.save_pretrained(tmp_path / "controlnet")
    with pytest.raises(WeightsError, match="describes a SeeSRControlNet, not a UNet2DCondition"):
        load_seesr_unet(tmp_path / "controlnet")
    with pytest.raises(WeightsError, match=r"has no config\.json"):
        load_seesr_controlnet(tmp_path / "nowhere")
