"""The `seesr` family on tiny random components laid out as SeeSR's release: the conformance
kit, what trains, SeeSR's prompt and the frozen reference with its image attention."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rfsr_ray.config import ModelConfig
from rfsr_ray.errors import WeightsError
from rfsr_ray.models import build_model, load_model
from rfsr_ray.models.seesr.family import TAGGER_FILES, compose_prompt
from rfsr_ray.models.tiny import MODEL_INFO_FILE
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


def sample(model, lr_image: torch.Tensor, seed: int = 5) -> torch.Tensor:
    return model.sample(lr_image, 2, torch.Generator().manual_seed(seed))


def test_export_names_its_tagger_by_absolute_path_and_reloads_with_it(
    seesr_folder, tmp_path, monkeypatch
):
    shutil.copytree(seesr_folder / "tagger", tmp_path / "tagger")
    monkeypatch.chdir(tmp_path)  # tagger paths relative to here, as a hand-written config has
    seesr = {"tagger_size": "tiny", **TINY_TAGGER}
    model = builder(ModelConfig(family="seesr", pretrained=str(seesr_folder), seesr=seesr))()
    with torch.no_grad():  # trained weights, unlike the folder's
        for parameter in model.trainable_parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    export = model.save(tmp_path / "export")
    recorded = json.loads((export / MODEL_INFO_FILE).read_text())["model_config"]["seesr"]
    assert {name: recorded[name] for name in TAGGER_FILES} == {
        name: str(tmp_path / path) for name, path in TINY_TAGGER.items()
    }
    assert recorded["tagger_size"] == "tiny"
    assert not (export / "tagger").exists()  # named, not copied

    monkeypatch.chdir(seesr_folder)  # elsewhere: only the absolute paths find the tagger
    lr_image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    loaded = load_model(export)
    assert torch.equal(sample(loaded, lr_image), sample(model, lr_image))
    base = build_model(seesr_config(seesr_folder), 4, trainable=False)
    assert not torch.allclose(sample(base, lr_image), sample(loaded, lr_image))


def test_export_whose_tagger_file_is_gone_is_refused_by_name(seesr_folder, tmp_path):
    shutil.copytree(seesr_folder / "tagger", tmp_path / "tagger")
    files = {name: str(tmp_path / path) for name, path in TINY_TAGGER.items()}
    seesr = {"tagger_size": "tiny", **files}
    cfg = ModelConfig(family="seesr", pretrained=str(seesr_folder), seesr=seesr)
    model = build_model(cfg, 4, trainable=False)
    export = model.save(tmp_path / "export")
    (tmp_path / TINY_TAGGER["dape"]).unlink()
    with pytest.raises(WeightsError, match=r"model\.seesr\.dape=.*DAPE\.pth.* does not exist"):
        load_model(export)
