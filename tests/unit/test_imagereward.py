"""ImageReward on transformers' BLIP parts, checked against the released `image-reward` package:
its `ImageReward.pt` key names and shapes, and the scores its own model classes give for a small
model (tests/fixtures, written by tests/fixtures/make_imagereward_fixtures.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rfsr_ray.config import RewardConfig, build_config
from rfsr_ray.errors import WeightsError
from rfsr_ray.losses.imagereward import (
    RELEASED_MEAN,
    RELEASED_STD,
    ImageRewardModel,
    configs_from,
    convert_released,
    load_released,
)
from rfsr_ray.losses.rewards import build_reward
from rfsr_ray.weights import weights_needed, why_missing
from tests.fixtures.make_imagereward_fixtures import seeded_weights

FIXTURES = Path(__file__).parents[1] / "fixtures"
WORDS = ["a", "photo", "of", "cat", "dog", "sharp", "blurry", "the"]
# Released tensors ImageReward's scoring never reads: BLIP's contrastive projections and the
# text position index buffer (transformers rebuilds it).
UNUSED_RELEASED = {
    "blip.vision_proj.weight",
    "blip.vision_proj.bias",
    "blip.text_proj.weight",
    "blip.text_proj.bias",
    "blip.text_encoder.embeddings.position_ids",
}

# The released sizes: BLIP's ViT-L/16 at 224 px and its med BERT-base over the ViT's tokens.
VIT_L16 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
           "num_attention_heads": 16, "image_size": 224, "patch_size": 16}  # fmt: skip
MED_BERT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 12, "vocab_size": 30524,
            "encoder_hidden_size": 1024}  # fmt: skip


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> tuple[Path, Path]:
    """A small checkpoint in the released layout (the tiny released model's keys, seeded
    weights) and a stand-in BERT vocabulary."""
    from transformers import BertTokenizer

    root = tmp_path_factory.mktemp("imagereward")
    vocab = root / "bert" / "vocab.txt"
    vocab.parent.mkdir()
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(vocab.parent)
    checkpoint = root / "ImageReward.pt"
    torch.save(seeded_weights(fixture("imagereward_tiny_scores.json")["shapes"]), checkpoint)
    return checkpoint, vocab.parent


def term_for(staged, **extra: object):
    checkpoint, tokenizer = staged
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


def test_every_released_weight_lands_on_one_of_ours_with_its_shape():
    """The full-size released key set: each key but the unused ones is renamed onto a distinct
    parameter of the ViT-L/16 + BERT-base model, shapes agree, and nothing of ours stays unset."""
    shapes = fixture("imagereward_state_keys.json")["keys"]
    released = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    converted = convert_released(released)
    source = {id(tensor): key for key, tensor in released.items()}
    assert set(released) - {source[id(t)] for t in converted.values()} == UNUSED_RELEASED
    vision, text = configs_from(converted)
    assert {name: getattr(vision, name) for name in VIT_L16} == VIT_L16
    assert {name: getattr(text, name) for name in MED_BERT} == MED_BERT
    with torch.device("meta"):
        ours = ImageRewardModel(vision, text)
    expected = ours.state_dict()
    wrong = {k: (tuple(v.shape), tuple(expected[k].shape)) for k, v in converted.items()
             if k in expected and v.shape != expected[k].shape}  # fmt: skip
    assert not wrong
    ours.load_state_dict(converted, strict=True)  # no key of ours unset, none left over


def test_released_layout_loads_every_weight_and_scores_like_the_model(staged):
    """Scores equal those the released package's `ImageReward.score_gard` gives with the same
    weights (z-scored with the released mean and std)."""
    tiny = fixture("imagereward_tiny_scores.json")
    loaded = load_released(staged[0]).eval()  # no dropout, as the released scores
    assert loaded.vision.config.num_attention_heads == 2 and loaded.image_size == 32
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(tiny["image_seed"]))
    with torch.no_grad():
        raw = loaded(image, torch.tensor(tiny["input_ids"]), torch.tensor(tiny["attention_mask"]))
    scores = (raw - RELEASED_MEAN) / RELEASED_STD
    torch.testing.assert_close(scores, torch.tensor(tiny["scores"]), rtol=1e-4, atol=1e-5)


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
        term_for((tmp_path / "absent", staged[1]))
    foreign = tmp_path / "foreign.pt"
    torch.save({"blip.visual_encoder.cls_token": torch.zeros(1, 1, 8)}, foreign)
    with pytest.raises(WeightsError, match="not an ImageReward checkpoint"):
        term_for((foreign, staged[1]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = build_config({"losses": {"reward": {"terms": [{"name": "imagereward"}]}}})
    needs = {n.name: n for n in weights_needed(cfg, "train") if n.kind == "hub"}
    assert set(needs) == {"THUDM/ImageReward", "bert-base-uncased"}
    assert "THUDM/ImageReward" in why_missing(needs["THUDM/ImageReward"], cfg)
