"""ImageReward on transformers' BLIP parts, from a stand-in checkpoint written in the released
`ImageReward.pt` layout (BLIP ViT + med BERT + MLP key names) and a stand-in BERT vocabulary."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rfsr_ray.config import RewardConfig, build_config
from rfsr_ray.errors import WeightsError
from rfsr_ray.losses.imagereward import (
    ImageRewardModel,
    load_released,
    text_config,
    vision_config,
)
from rfsr_ray.losses.rewards import build_reward
from rfsr_ray.weights import weights_needed, why_missing

WORDS = ["a", "photo", "of", "cat", "dog", "sharp", "blurry", "the"]


def released_layout(model: ImageRewardModel) -> dict[str, torch.Tensor]:
    """The model's weights under the names the released checkpoint uses."""
    vision_names = {
        "embeddings.class_embedding": "cls_token",
        "embeddings.position_embedding": "pos_embed",
        "post_layernorm.weight": "norm.weight",
        "post_layernorm.bias": "norm.bias",
    }
    layer_parts = {
        "layer_norm1": "norm1",
        "layer_norm2": "norm2",
        "self_attn.qkv": "attn.qkv",
        "self_attn.projection": "attn.proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    state: dict[str, torch.Tensor] = {}
    for key, value in model.vision.state_dict().items():
        if key in vision_names:
            name = vision_names[key]
        elif key.startswith("embeddings.patch_embedding."):
            name = key.replace("embeddings.patch_embedding.", "patch_embed.proj.")
        else:
            index, rest = key.removeprefix("encoder.layers.").split(".", 1)
            part, leaf = rest.rsplit(".", 1)
            name = f"blocks.{index}.{layer_parts[part]}.{leaf}"
        state[f"blip.visual_encoder.{name}"] = value.clone()
    for key, value in model.text.state_dict().items():
        state[f"blip.text_encoder.{key}"] = value.clone()
    for key, value in model.head.state_dict().items():
        state[f"mlp.layers.{key}"] = value.clone()
    state["blip.vision_proj.weight"] = torch.zeros(4, 4)  # BLIP heads ImageReward never uses
    return state


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> tuple[Path, Path, ImageRewardModel]:
    from transformers import BertTokenizer

    root = tmp_path_factory.mktemp("imagereward")
    vocab = root / "bert" / "vocab.txt"
    vocab.parent.mkdir()
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(vocab.parent)
    torch.manual_seed(0)
    shared = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 1}  # fmt: skip
    vision = vision_config(**shared, image_size=32, patch_size=8)
    text = text_config(encoder_hidden_size=64, vocab_size=len(WORDS) + 7, **shared)
    model = ImageRewardModel(vision, text)
    for parameter in model.head.parameters():  # released heads are trained, not near zero
        torch.nn.init.normal_(parameter, std=0.5)
    checkpoint = root / "ImageReward.pt"
    torch.save(released_layout(model), checkpoint)
    return checkpoint, vocab.parent, model


def term_for(staged, **extra: object):
    checkpoint, tokenizer, _ = staged
    cfg = RewardConfig(
        name="imagereward",
        weights=str(checkpoint),
        tokenizer=str(tokenizer),
        weight=1.0,
        prompt="a sharp photo",
        **extra,
    )
    return build_reward(cfg)


def images(seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(seed))


def test_released_layout_loads_every_weight_and_scores_like_the_model(staged):
    checkpoint, _, original = staged
    loaded = load_released(checkpoint)
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.vision.config.num_attention_heads == 1 and loaded.image_size == 32


def test_imagereward_gradient_reaches_the_image_and_the_prompt_matters(staged):
    term = term_for(staged)
    sr = images().requires_grad_(True)
    loss, score = term(sr)
    loss.backward()
    assert score.shape == (2,) and torch.isfinite(score).all()
    assert torch.isfinite(sr.grad).all() and sr.grad.abs().sum() > 0
    with torch.no_grad():
        fixed = term.reward(images())
        captions = term.reward(images(), prompt=["a cat", "the blurry dog"])
    assert not torch.allclose(fixed, captions)  # per-sample prompts replace the fixed one


def test_preprocessing_matches_torchvision_on_tensors(staged):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    model = load_released(staged[0])
    image = images()
    ours = model.preprocess(image)
    resized = TF.resize(image, 32, interpolation=InterpolationMode.BICUBIC, antialias=True)
    theirs = TF.normalize(TF.center_crop(resized, 32), (0.48145466, 0.4578275, 0.40821073),
                          (0.26862954, 0.26130258, 0.27577711))  # fmt: skip
    assert ours.shape == (2, 3, 32, 32) and torch.allclose(ours, theirs, atol=1e-5)


def test_prompt_dropout_is_seeded(staged):
    first = term_for(staged, prompt_drop_prob=0.5).reward
    second = term_for(staged, prompt_drop_prob=0.5).reward
    draws = [first.prompts_for(8, None) for _ in range(3)]
    assert draws == [second.prompts_for(8, None) for _ in range(3)]
    assert {t for d in draws for t in d} == {"", "a sharp photo"}


def test_missing_or_foreign_checkpoint_is_refused(staged, tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match="no such folder"):
        term_for((tmp_path / "absent", staged[1], None))
    foreign = tmp_path / "foreign.pt"
    torch.save({"blip.visual_encoder.cls_token": torch.zeros(1, 1, 8)}, foreign)
    with pytest.raises(WeightsError, match="not an ImageReward checkpoint"):
        term_for((foreign, staged[1], None))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = build_config({"losses": {"reward": {"terms": [{"name": "imagereward"}]}}})
    needs = {n.name: n for n in weights_needed(cfg, "train") if n.kind == "hub"}
    assert set(needs) == {"THUDM/ImageReward", "bert-base-uncased"}
    assert "THUDM/ImageReward" in why_missing(needs["THUDM/ImageReward"], cfg)
