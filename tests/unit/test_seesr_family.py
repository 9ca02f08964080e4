"""The `seesr` family on tiny random components laid out as SeeSR's release: the conformance
kit, what trains, SeeSR's prompt and the frozen reference with its image attention."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rfsr_ray.config import ModelConfig
from rfsr_ray.errors import WeightsError
from rfsr_ray.models import build_model
from rfsr_ray.models.seesr.family import compose_prompt
from rfsr_ray.testing.conformance import CHECKS, ConformanceCase, check_isr_model
from rfsr_ray.testing.tiny_components import TINY_TAGGER, save_tiny_components


@pytest.fixture(scope="module")
def seesr_folder(tmp_path_factory) -> Path:
    return save_tiny_components("seesr", tmp_path_factory.mktemp("seesr") / "seesr")


def seesr_config(folder: Path, **model: object) -> ModelConfig:
    files = {key: str(folder / name) for key, name in TINY_TAGGER.items()}
    seesr = {"tagger_size": "tiny", **files, **model.pop("seesr", {})}
    return ModelConfig(family="seesr", pretrained=str(folder), seesr=seesr, **model)


def builder(cfg: ModelConfig):
    def build():
        torch.manual_seed(0)
        return build_model(cfg, 4)

    return build


@pytest.mark.parametrize("check", CHECKS)
def test_seesr_conforms(seesr_folder, check):
    check_isr_model(ConformanceCase(build=builder(seesr_config(seesr_folder))), only=[check])


def test_reference_trains_the_controlnet_and_the_unet_image_attention(seesr_folder):
    model = builder(seesr_config(seesr_folder))()
    trained = {id(p) for p in model.trainable_parameters()}
    assert all(id(p) in trained for p in model.controlnet.parameters())
    unet = dict(model.unet.named_parameters())
    assert {n for n, p in unet.items() if id(p) in trained} == {
        n for n in unet if ".image_attentions." in n
    }
    # The Gram reference is the original SeeSR: frozen copies of the image attention too.
    assert any(".image_attentions." in name for name in model.reference["unet"].names)


def test_lora_trains_only_adapters(seesr_folder):
    lora = {"finetune": "lora", "lora": {"enabled": True, "rank": 2, "apply_to": ["unet"]}}
    model = builder(seesr_config(seesr_folder, **lora))()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)


def test_prompt_is_seesr_own():
    assert compose_prompt("sky, tree", "", "clean, high-resolution, 8k") == (
        "sky, tree, ,clean, high-resolution, 8k"
    )


def test_given_embeddings_are_used_instead_of_tagging(seesr_folder):
    model = builder(seesr_config(seesr_folder))()
    lr = torch.rand(2, 3, 8, 8)
    embeds = torch.randn(2, 17, 512)
    condition = model.condition(lr, None, ["sky", "tree"], mode="train", image_embeds=embeds)
    assert model.tagger is None  # nothing tagged: the data carried tags and embeddings
    assert torch.equal(condition.image_embeds, embeds)


def test_a_folder_without_seesr_unet_is_refused(seesr_folder, tmp_path):
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
        (tmp_path / name).symlink_to(seesr_folder / name)
    cfg = seesr_config(seesr_folder).model_copy(update={"pretrained": str(tmp_path)})
    with pytest.raises(WeightsError, match="unet/"):
        build_model(cfg, 4)
