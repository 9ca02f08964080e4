"""SeeSR's DAPE tagger on timm's Swin and transformers' BERT parts, checked against SeeSR's own
RAM classes: the key names and shapes of `ram_swin_large_14m.pth` / `DAPE.pth`, and the outputs
of a small RAMLora with LoRA merged (tests/fixtures/ram_state_keys.json, written by
tests/fixtures/make_ram_fixtures.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from rfsr_ray.errors import ConfigError, WeightsError
from rfsr_ray.models.seesr.tagger import (
    DAPE_FILE,
    RAM_FILE,
    TagList,
    apply_dape,
    build_dape_tagger,
    convert_released,
    load_dape_tagger,
    load_tag_list,
    lora_sites,
    released_config,
    tiny_config,
)
from tests.fixtures.make_ram_fixtures import seeded_weights

FIXTURE = json.loads((Path(__file__).parents[1] / "fixtures" / "ram_state_keys.json").read_text())
TINY = FIXTURE["tiny"]


def meta(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


@pytest.fixture(scope="module")
def released_tagger():
    with torch.device("meta"):
        return build_dape_tagger(released_config())


@pytest.fixture()
def tiny_files(tmp_path) -> dict[str, Path]:
    """The fixture's small SeeSR RAMLora in the released layout: RAM entries in {"model": ...},
    the LoRA factors in a flat DAPE file, its tag list and thresholds."""
    weights = seeded_weights(TINY["shapes"])
    files = {name: tmp_path / name for name in ("ram.pth", "dape.pth", "tags.txt", "thr.txt")}
    torch.save({"model": {k: v for k, v in weights.items() if "lora_" not in k}}, files["ram.pth"])
    torch.save({k: v for k, v in weights.items() if "lora_" in k}, files["dape.pth"])
    files["tags.txt"].write_text("\n".join(TINY["tags"]))
    files["thr.txt"].write_text("\n".join(map(str, TINY["thresholds"])))
    return files


def load_tiny(files: dict[str, Path], **changes: Path):
    paths = files | changes
    return load_dape_tagger(
        paths["ram.pth"], paths["dape.pth"], paths["tags.txt"], paths["thr.txt"], tiny_config()
    )


def test_released_ram_keys_map_exactly_onto_the_tagger(released_tagger) -> None:
    ours = released_tagger.state_dict()
    converted = convert_released(meta(FIXTURE["ram"]))
    assert sorted(converted) == sorted(ours)
    assert {k: list(v.shape) for k, v in converted.items()} == {
        k: list(v.shape) for k, v in ours.items()
    }
    dropped = {k for k in FIXTURE["ram"] if not k.startswith(("visual_encoder.", "tagging_head."))}
    dropped -= {"label_embed", "image_proj.weight", "image_proj.bias", "fc.weight", "fc.bias"}
    dropped -= {"wordvec_proj.weight", "wordvec_proj.bias"}
    assert {k.split(".")[0] for k in dropped} == {"tag_encoder", "text_decoder"}
    # Spot checks of the renaming, read off the fixture's names, not off our inverse.
    assert converted["visual_encoder.layers.1.downsample.reduction.weight"].shape == (384, 768)
    assert "visual_encoder.layers.0.downsample.reduction.weight" in FIXTURE["ram"]
    assert converted["tagging_head.1.crossattention.self.key.weight"].shape == (768, 512)


def test_released_dape_lora_covers_every_adapted_weight(released_tagger) -> None:
    sites = lora_sites(released_tagger)
    assert len(sites) == 24 + 2 * 2  # every Swin qkv; query and key of both tagging layers
    weights = convert_released(meta(FIXTURE["ram"]))
    merged = apply_dape(weights, meta(FIXTURE["dape"]), released_tagger, Path(DAPE_FILE))
    assert all(merged[site].shape == weights[site].shape for site in sites)


def test_released_image_embeds_shape() -> None:
    config = released_config()
    assert (config.num_tokens, config.embed_width, config.num_tags) == (145, 512, 4585)
    tags = load_tag_list()
    assert len(tags.tags) == len(tags.thresholds) == 4585
    assert tags.tags[:2] == ("3D CG rendering", "3D glasses")


def test_tiny_load_matches_seesr_own_model(tiny_files) -> None:
    tagger = load_tiny(tiny_files)
    # The fixture fed SeeSR's model an already normalised image: skip our preprocessing.
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(TINY["image_seed"]))
    with torch.no_grad():
        image_embeds = tagger.image_embeds(image)
        logits = tagger.tag_logits(image_embeds)
    torch.testing.assert_close(image_embeds, torch.tensor(TINY["image_embeds"]))
    torch.testing.assert_close(logits, torch.tensor(TINY["logits"]))
    assert tagger.captions(logits) == TINY["captions"] == ["cat, dog, person", ""]
    assert not any(p.requires_grad for p in tagger.parameters()) and not tagger.training


def released_name(key: str) -> str:
    """Our name as the released layout spells it (test-side inverse, for writing files)."""
    merge = re.match(r"visual_encoder\.layers\.(\d+)\.downsample\.(.+)$", key)
    if merge:
        return f"visual_encoder.layers.{int(merge[1]) - 1}.downsample.{merge[2]}"
    return re.sub(r"^tagging_head\.(\d+)\.", r"tagging_head.encoder.layer.\1.", key)


def zero_lora(tagger) -> dict[str, torch.Tensor]:
    """DAPE factors that change nothing (B = 0, as loralib initialises them), rank 8."""
    factors = {}
    for site in lora_sites(tagger):
        out, width = tagger.state_dict()[site].shape
        groups, rows = (2, out // 3) if site.endswith("qkv.weight") else (1, out)
        module = released_name(site).removesuffix(".weight")
        factors[f"{module}.lora_A"] = torch.randn(8 * groups, width)
        factors[f"{module}.lora_B"] = torch.zeros(rows * groups, 8)
    return factors


def test_saved_tiny_tagger_loads_back_identically(tmp_path) -> None:
    torch.manual_seed(0)
    tagger = build_dape_tagger(tiny_config(), TagList(tuple("abcdef"), (0.5,) * 6)).eval()
    ram = {released_name(k): v for k, v in tagger.state_dict().items()}
    ram["visual_encoder.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16)
    ram["tag_encoder.encoder.layer.0.output.dense.weight"] = torch.zeros(3, 3)  # unused part
    torch.save({"model": ram}, tmp_path / RAM_FILE)
    torch.save(zero_lora(tagger), tmp_path / DAPE_FILE)
    (tmp_path / "tags.txt").write_text("\n".join("abcdef"))
    loaded = load_dape_tagger(
        tmp_path / RAM_FILE, tmp_path / DAPE_FILE, tmp_path / "tags.txt", config=tiny_config()
    )
    lr_image = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for expected, actual in zip(tagger(lr_image), loaded(lr_image), strict=True):
            torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_dape_lora_and_plain_entries_override_ram(tiny_files) -> None:
    module = "visual_encoder.layers.0.blocks.1.attn.qkv"  # a shifted block's (48, 16) qkv
    lora_a, lora_b = torch.randn(16, 16), torch.randn(32, 8)
    factors = {f"{module}.lora_A": lora_a, f"{module}.lora_B": torch.zeros(32, 8)}
    rewrite(tiny_files["dape.pth"], lambda s: s.update(factors))
    base = load_tiny(tiny_files).state_dict()
    plain = {f"{module}.lora_B": lora_b, "fc.bias": torch.tensor([3.0])}
    rewrite(tiny_files["dape.pth"], lambda s: s.update(plain))
    changed = load_tiny(tiny_files).state_dict()
    delta = changed[f"{module}.weight"] - base[f"{module}.weight"]
    # loralib's MergedLinear(enable_lora=[True, False, True]), rank 8, alpha 1: group 0 adapts
    # the q rows, group 1 the v rows, the k rows stay RAM's.
    torch.testing.assert_close(delta[:16], lora_b[:16] @ lora_a[:8] / 8, atol=1e-6, rtol=0)
    assert delta[16:32].abs().max() == 0
    torch.testing.assert_close(delta[32:], lora_b[16:] @ lora_a[8:] / 8, atol=1e-6, rtol=0)
    assert changed["fc.bias"].item() == 3.0 != base["fc.bias"].item()


def rewrite(path: Path, edit) -> None:
    state = torch.load(path)
    edit(state.get("model", state))
    torch.save(state, path)


def test_missing_ram_key_is_refused(tiny_files) -> None:
    rewrite(tiny_files["ram.pth"], lambda s: s.pop("fc.weight"))
    with pytest.raises(WeightsError, match=r"1 parameter\(s\) missing \(e\.g\. \['fc\.weight'\]"):
        load_tiny(tiny_files)


def test_unexpected_ram_key_is_refused(tiny_files) -> None:
    rewrite(tiny_files["ram.pth"], lambda s: s.update({"visual_encoder.head.w": torch.zeros(1)}))
    with pytest.raises(WeightsError, match=r"1 unexpected key\(s\) .*visual_encoder\.head\.w"):
        load_tiny(tiny_files)


def test_wrong_shape_is_refused(tiny_files) -> None:
    rewrite(tiny_files["ram.pth"], lambda s: s.update({"fc.bias": torch.zeros(2)}))
    with pytest.raises(WeightsError, match=r"1 with other shapes .*fc\.bias \(2,\)"):
        load_tiny(tiny_files)


def test_dape_without_a_lora_site_is_refused(tiny_files) -> None:
    site = "tagging_head.encoder.layer.1.crossattention.self.key"
    rewrite(tiny_files["dape.pth"], lambda s: [s.pop(f"{site}.lora_A"), s.pop(f"{site}.lora_B")])
    with pytest.raises(WeightsError, match=r"1 adapted weight\(s\) without LoRA .*tagging_head\.1"):
        load_tiny(tiny_files)


def test_dape_unpaired_or_unplaceable_lora_is_refused(tiny_files) -> None:
    site = "visual_encoder.layers.1.blocks.0.attn.qkv"
    rewrite(tiny_files["dape.pth"], lambda s: s.pop(f"{site}.lora_B"))
    with pytest.raises(WeightsError, match=rf"without both lora_A and lora_B .*{site}"):
        load_tiny(tiny_files)
    rewrite(tiny_files["dape.pth"], lambda s: s.update({f"{site}.lora_B": torch.zeros(5, 8)}))
    with pytest.raises(WeightsError, match=rf"1 unexpected LoRA module\(s\) .*{site}"):
        load_tiny(tiny_files)


def test_each_missing_file_is_named_with_its_source(tiny_files, tmp_path) -> None:
    with pytest.raises(WeightsError, match=rf"{RAM_FILE} not found at .*RAM's .*huggingface"):
        load_tiny(tiny_files, **{"ram.pth": tmp_path / "absent.pth"})
    with pytest.raises(WeightsError, match=rf"{DAPE_FILE} not found at .*LoRA.*drive\.google"):
        load_tiny(tiny_files, **{"dape.pth": tmp_path / "absent.pth"})
    with pytest.raises(ConfigError, match=r"tag list file .* does not exist"):
        load_tiny(tiny_files, **{"tags.txt": tmp_path / "absent.txt"})


def test_tag_list_must_fit_the_head(tmp_path) -> None:
    (tmp_path / "tags.txt").write_text("a\nb")
    (tmp_path / "thr.txt").write_text("0.5")
    with pytest.raises(ConfigError, match="holds 1 thresholds for the 2 tags"):
        load_tag_list(tmp_path / "tags.txt", tmp_path / "thr.txt")
    with pytest.raises(ConfigError, match="has 2 tags but the tagger config has num_tags=6"):
        build_dape_tagger(tiny_config(), load_tag_list(tmp_path / "tags.txt"))
    assert load_tag_list(tmp_path / "tags.txt").thresholds == (0.68, 0.68)


def test_tag_thresholds_and_caption_format() -> None:
    torch.manual_seed(0)
    tags = TagList(("cat", "dog", "tree", "sky", "car", "person"), (0.5, 0.7, 0.55, 0.9, 0.2, 0.6))
    tagger = build_dape_tagger(tiny_config(), tags).eval()
    with torch.no_grad():
        tagger.fc.weight.zero_()
        tagger.fc.bias.fill_(torch.logit(torch.tensor(0.6)).item())  # every tag at p = 0.6
    output = tagger.tag(torch.rand(3, 3, 17, 23))
    # kept: p > threshold strictly ("person" sits at 0.6 and is dropped), in tag-list order
    assert output.captions == ["cat, tree, car"] * 3
    assert output.image_embeds.shape == (3, tiny_config().num_tokens, 512) == (3, 17, 512)
    logits = torch.tensor([[-9.0] * 6, [9.0] * 6])
    assert tagger.captions(logits) == ["", "cat, dog, tree, sky, car, person"]


def test_preprocessing_resizes_and_normalises() -> None:
    from torchvision.transforms import Normalize, Resize

    tagger = build_dape_tagger(tiny_config(), TagList(tuple("abcdef"), (0.5,) * 6))
    lr_image = torch.rand(2, 3, 12, 20, generator=torch.Generator().manual_seed(0))
    expected = Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(
        Resize((32, 32), antialias=False)(lr_image)
    )
    torch.testing.assert_close(tagger.preprocess(lr_image), expected)
    bicubic = build_dape_tagger(
        tiny_config(resize_mode="bicubic"), TagList(tuple("abcdef"), (0.5,) * 6)
    )
    assert bicubic.preprocess(lr_image).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"shape \(3, 12, 20\); pass \(B, 3, h, w\)"):
        tagger.preprocess(lr_image[0])
    with pytest.raises(ConfigError, match="resize_mode='nearest'"):
        tiny_config(resize_mode="nearest")
