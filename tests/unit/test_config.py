from __future__ import annotations

from pathlib import Path

import pytest

from rfsr_ray.config import apply_override, build_config, load_config
from rfsr_ray.errors import ConfigError


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = build_config()
    assert cfg.degradation.jpeg_range == (30, 95)
    path = cfg.save(tmp_path / "c.yaml")
    assert load_config(path) == cfg


def test_typo_key_is_rejected_with_its_name():
    with pytest.raises(ConfigError, match=r"data\.patch_sise.*unknown key"):
        build_config({"data": {"patch_sise": 64}})


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"train\.steps=\"many\""):
        build_config({"train": {"steps": "many"}})


def test_inverted_range_names_key_and_fix():
    with pytest.raises(
        ConfigError, match=r"degradation\.jpeg_range=\[95, 30\].*ascending.*\[30, 95\]"
    ):
        build_config({"degradation": {"jpeg_range": [95, 30]}})


def test_window_outside_schedule_is_rejected():
    with pytest.raises(ConfigError, match=r"losses\.reward\.window=\[40, 60\]"):
        build_config({"losses": {"reward": {"window": [40, 60]}}})


def test_overrides_parse_lists_numbers_and_sources():
    cfg = load_config(
        None,
        [
            "degradation.jpeg_range=[40,90]",
            "train.lr=1e-4",
            "data.sources=[builtin,/data/hr,s3://b/x.parquet]",
        ],
    )
    assert cfg.degradation.jpeg_range == (40, 90)
    assert cfg.train.lr == pytest.approx(1e-4)
    kinds = [s.kind for s in cfg.data.sources]
    assert kinds == ["builtin", "folder", "parquet"]


def test_list_item_override():
    tree = {"losses": {"reward": {"terms": [{"name": "gmsd"}]}}}
    apply_override(tree, "losses.reward.terms.0.weight=0.5")
    assert build_config(tree).losses.reward.terms[0].weight == 0.5
    with pytest.raises(ConfigError, match="not an index"):
        apply_override(tree, "losses.reward.terms.3.weight=1")
    with pytest.raises(ConfigError, match="give the whole list"):
        apply_override({}, "losses.reward.terms.0.weight=1")
    whole = {}
    apply_override(whole, "losses.reward.terms=[{name: fsim, weight: 0.2}]")
    assert build_config(whole).losses.reward.terms[0].name == "fsim"


def test_preset_fills_fields_and_explicit_fields_win():
    mild = build_config({"degradation": {"preset": "mild"}}).degradation
    assert mild.jpeg_range == (60, 95) and mild.resize_range == (0.3, 1.5)
    custom = build_config({"degradation": {"preset": "mild", "jpeg_range": [10, 20]}})
    assert custom.degradation.jpeg_range == (10, 20)


def test_patch_size_must_divide_by_scale():
    with pytest.raises(ConfigError, match=r"multiple of data\.scale"):
        build_config({"data": {"patch_size": 66, "scale": 4}})


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")


@pytest.mark.parametrize(
    "path", sorted(str(p) for p in (Path(__file__).parents[2] / "configs").rglob("*.yaml"))
)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.family in ("tiny", "sd_upscaler", "controlnet_sr")
