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


def test_val_patch_size_must_divide_by_scale_and_defaults_to_patch_size():
    with pytest.raises(ConfigError, match=r"data.val_patch_size=130 .* e.g. 128"):
        build_config({"data": {"val_patch_size": 130, "scale": 4}})
    assert build_config({"data": {"val_patch_size": 128}}).data.val_patch_size == 128
    assert build_config({}).data.val_patch_size is None  # validation crops use data.patch_size


def test_patch_size_must_divide_by_scale():
    with pytest.raises(ConfigError, match=r"multiple of data\.scale"):
        build_config({"data": {"patch_size": 66, "scale": 4}})


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")


_REPO = Path(__file__).parents[2]


# Ids are paths relative to the checkout, so the collected ids are the same in every clone.
@pytest.mark.parametrize(
    "path",
    sorted(str(p.relative_to(_REPO)) for p in (_REPO / "configs").rglob("*.yaml")),
)
def test_every_shipped_config_loads(path):
    path = str(_REPO / path)
    cfg = load_config(path)
    assert cfg.model.family in ("tiny", "sd_upscaler", "controlnet_sr", "seesr")


def test_renamed_keys_name_their_new_place():
    with pytest.raises(ConfigError) as error:
        build_config(
            {"train": {"objective": "rfsr"}, "tune": {"objective": {}}, "output": {"dir": "x"}}
        )
    text = str(error.value)
    assert "train.objective was renamed train.loss" in text
    assert "tune.objective was renamed train.val_objective" in text
    assert "output.dir was renamed prepare.dir" in text


def _string_fields(model: type, prefix: str = ""):
    """(dotted name, FieldInfo, annotation) of every field of the schema, recursively."""
    import typing

    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = [a for a in typing.get_args(field.annotation) or (field.annotation,)]
        models = [a for a in nested if isinstance(a, type) and issubclass(a, BaseModel)]
        for sub in models:
            yield from _string_fields(sub, f"{key}.")
        if not models:
            yield key, field


def test_every_path_like_field_is_typed_as_a_path():
    """A new field that names a file or folder must be typed `LocalPath` (or one of its kin), or
    it stays relative on Ray workers, which run in other directories."""
    from rfsr_ray.config import PathField, RFSRConfig

    words = ("folder", "path", "file", "dir", "checkpoint", ".pt")
    unmarked = []
    marked = []
    for key, field in _string_fields(RFSRConfig):
        is_marked = any(isinstance(m, PathField) for m in field.metadata)
        marked += [key] if is_marked else []
        leaf = key.rsplit(".", 1)[-1]
        text = f"{leaf} {field.description or ''}".lower()
        if leaf.endswith(("_extension", "_column")):  # names inside files, not paths
            continue
        if not is_marked and "str" in str(field.annotation) and any(w in text for w in words):
            unmarked.append(key)
    assert unmarked == [], f"type these as LocalPath / HubOrLocalPath / ModelSource: {unmarked}"
    assert len(marked) >= 20  # every known path field is found by the walk


def test_relative_paths_become_absolute_and_hub_ids_stay(tmp_path, monkeypatch):
    from rfsr_ray.config import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "ImageReward.pt").touch()  # an existing relative file is a path
    tree = {
        "data": {"sources": ["rel/hr"], "val_pairs": "rel/val"},
        "model": {"family": "sd_upscaler", "pretrained": "acme/upscaler"},
        "losses": {
            "reward": {
                "terms": [
                    {
                        "name": "imagereward",
                        "weights": "rel/ImageReward.pt",
                        "tokenizer": "google-bert/bert-base-uncased",
                    }
                ]
            },
            "gram": {"vgg_weights": "rel/vgg19.pth"},
        },
        "output": {"storage_path": "rel/runs"},
        "prepare": {"dir": "rel/pairs"},
        "eval": {
            "models": [{"name": "m", "path": "rel/model"}],
            "test_sets": [{"name": "t", "kind": "paired", "lr": "rel/lr", "hr": "rel/hr"}],
        },
    }
    cfg = with_absolute_paths(build_config(tree))
    here = str(tmp_path)
    for value in (
        cfg.data.sources[0].path,
        cfg.data.val_pairs,
        cfg.losses.reward.terms[0].weights,
        cfg.losses.gram.vgg_weights,
        cfg.output.storage_path,
        cfg.prepare.dir,
        cfg.eval.models[0].path,
        cfg.eval.test_sets[0].lr,
        cfg.tune.storage_path,
        cfg.infer.output,
    ):
        assert value.startswith(here + "/"), value
    assert cfg.model.pretrained == "acme/upscaler"  # a hub id
    assert cfg.losses.reward.terms[0].tokenizer == "google-bert/bert-base-uncased"
    tiny = with_absolute_paths(build_config({"model": {"pretrained": "base/tiny_x4"}}))
    assert tiny.model.pretrained == f"{here}/base/tiny_x4"  # the tiny family loads folders only
