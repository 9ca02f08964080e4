"""Plug-in model families (`model.family: plugin`): the builder is found by import path and checked
on the driver, a plug-in model trains in every step mode, and its export reloads from its folder
alone. The plug-in used is the documented skeleton, `examples/skeleton/skeleton_family/`."""

from __future__ import annotations

import json
import math
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rfsr_ray.config import build_config
from rfsr_ray.errors import ConfigError, WeightsError
from rfsr_ray.models import build_model, load_model, save_model
from rfsr_ray.models.plugin import check_built, check_plugin, import_builder
from rfsr_ray.testing.conformance import ConformanceCase, check_isr_model
from rfsr_ray.train.step import build_state, optimizer_step
from rfsr_ray.weights import weights_needed
from tests.unit.helpers import fixed_batch, seeded, tiny_config

ROOT = Path(__file__).resolve().parents[2]
SKELETON = ROOT / "examples" / "skeleton"
PLUGIN = {"family": "plugin", "builder": "skeleton_family:build", "options": {"channels": [8, 16]}}


@pytest.fixture(autouse=True)
def skeleton_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(SKELETON))


def plugin_config(model: dict | None = None, **sections: dict):
    return tiny_config(model={**PLUGIN, **(model or {})}, **sections)


def write_package(root: Path, name: str, body: str) -> Path:
    package = root / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(body))
    return package


# ------------------------------------------------------------------ finding the builder
def test_config_needs_a_builder_path_and_keeps_builder_keys_to_plugins():
    with pytest.raises(ConfigError, match=re.escape("model.builder='package.module:function'")):
        build_config({"model": {"family": "plugin"}})
    with pytest.raises(ConfigError, match=re.escape("set model.family=plugin or remove them")):
        build_config({"model": {"options": {"channels": [8]}}})


def test_import_errors_name_the_path_and_the_fix(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"'no_such_pkg:build'.*model.py_modules"):
        import_builder("no_such_pkg:build")
    with pytest.raises(ConfigError, match=r"has no attribute 'make'; it defines \[.*'build'"):
        import_builder("skeleton_family:make")
    with pytest.raises(ConfigError, match="not a callable"):
        import_builder("skeleton_family:SkeletonSR.family")
    write_package(tmp_path, "broken_plugin", "raise RuntimeError('needs CUDA 13')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="importing 'broken_plugin' failed: RuntimeError: needs"):
        import_builder("broken_plugin:build")


def test_a_builder_returning_a_non_model_is_refused_with_the_missing_members(tmp_path):
    write_package(tmp_path, "half_plugin", "def build(cfg, scale, trainable):\n    return 1\n")
    cfg = build_config({"model": {**PLUGIN, "builder": "half_plugin:build",
                                  "py_modules": [str(tmp_path / "half_plugin")]}})  # fmt: skip
    with pytest.raises(ConfigError, match=r"returned a int, which lacks .*'decode'.*'predict_x0'"):
        build_model(cfg.model, 4)


def test_the_builder_options_are_the_builders_to_validate():
    cfg = plugin_config(model={"options": {"chanels": [8]}})
    with pytest.raises(ConfigError, match=r"model.options: .*chanels|model.options: Extra"):
        build_model(cfg.model, 4)


def test_py_modules_make_a_package_importable_on_the_driver(tmp_path):
    package = write_package(
        tmp_path / "shipped", "shipped_plugin", "from skeleton_family import build\n"
    )
    cfg = build_config({"model": {**PLUGIN, "builder": "shipped_plugin:build",
                                  "py_modules": [str(package)]}})  # fmt: skip
    check_plugin(cfg.model)
    assert str(package.parent) in sys.path
    with pytest.raises(ConfigError, match=re.escape("is not a folder or a .whl/.zip file")):
        check_plugin(cfg.model.model_copy(update={"py_modules": (str(tmp_path / "missing"),)}))


def test_a_wrong_builder_fails_the_pipeline_before_ray_starts(capsys):
    import ray

    from pipelines.finetune import main

    assert main(["model.family=plugin", "model.builder=nowhere_pkg.models:build"]) == 2
    assert "cannot import 'nowhere_pkg.models'" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_scale_mismatch_is_named():
    model = build_model(plugin_config().model, 4)
    model.scale = 2
    with pytest.raises(ConfigError, match=re.escape("returned a x2 model for data.scale=4")):
        check_built(model, "skeleton_family:build", 4)


# ------------------------------------------------------------------ training, export, reload
@pytest.mark.parametrize("mode", ["trajectory", "one_step", "trajectory_buffer"])
def test_a_plugin_model_trains_in_every_step_mode(mode):
    cfg = plugin_config(schedule={"mode": mode})
    torch.manual_seed(0)
    state = build_state(cfg, build_model(cfg.model, 4), torch.device("cpu"))
    before = [p.detach().clone() for p in state.model.trainable_parameters()]
    result = optimizer_step(state, [fixed_batch()], cfg)
    assert not result.skipped and math.isfinite(result.grad_norm) and result.grad_norm > 0
    after = state.model.trainable_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_an_export_records_the_builder_and_reloads_from_its_folder(tmp_path):
    cfg = plugin_config()
    torch.manual_seed(0)
    model = build_model(cfg.model, 4)
    export = save_model(model, cfg.model, tmp_path / "model")
    info = json.loads((export / "rfsr_model.json").read_text())
    assert info["family"] == "plugin" and info["name"] == "skeleton"
    assert info["builder"] == "skeleton_family:build"
    assert info["options"] == {"channels": [8, 16]} and info["scale"] == 4
    lr = fixed_batch().lr_image
    expected = model.sample(lr, 4, seeded(3))
    assert torch.allclose(load_model(export).sample(lr, 4, seeded(3)), expected, atol=1e-6)


def test_a_plugin_export_whose_package_is_gone_says_so(tmp_path, monkeypatch):
    cfg = plugin_config()
    export = save_model(build_model(cfg.model, 4), cfg.model, tmp_path / "model")
    info = json.loads((export / "rfsr_model.json").read_text())
    info["builder"] = info["model_config"]["builder"] = "uninstalled_pkg:build"
    (export / "rfsr_model.json").write_text(json.dumps(info))
    with pytest.raises(WeightsError, match=re.escape("plug-in export that cannot be rebuilt")):
        load_model(export)


def test_weights_a_plugin_needs(tmp_path):
    folder = plugin_config(model={"pretrained": str(tmp_path)})
    first = weights_needed(folder, "train")[0]
    assert (first.kind, first.name) == ("model", str(tmp_path))
    hub = plugin_config(model={"pretrained": "CompVis/ldm-super-resolution-4x-openimages"})
    assert weights_needed(hub, "train")[0].kind == "diffusers"


def test_the_skeleton_passes_the_conformance_kit(tmp_path):
    cfg = plugin_config()

    def build():
        torch.manual_seed(0)
        return build_model(cfg.model, 4)

    check_isr_model(
        ConformanceCase(build=build, save=lambda m, p: save_model(m, cfg.model, p), lr_size=8)
    )


def test_the_docs_carry_the_skeleton_as_it_is():
    docs = (ROOT / "docs" / "plugins.md").read_text()
    assert (SKELETON / "skeleton_family" / "__init__.py").read_text().strip() in docs


def test_a_plugin_that_offers_lora_trains_only_its_adapters_and_reloads_its_export(
    tmp_path, monkeypatch, folders
):
    """`model.finetune` and `model.lora` reach the builder: a plug-in that offers LoRA (here one
    that wraps a diffusers upscaler) trains only its adapters, and its merged export reloads."""
    write_package(
        tmp_path,
        "lora_family",
        """
        from rfsr_ray.models import build_model

        def build(cfg, scale, trainable):
            inner = cfg.model_copy(update={"family": "sd_upscaler", "builder": None, "options": {}})
            return build_model(inner, scale, trainable)
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model_section = {
        "family": "plugin",
        "builder": "lora_family:build",
        "pretrained": str(folders["sd_upscaler"]),
        "finetune": "lora",
        "lora": {"enabled": True, "rank": 2, "merge_on_export": True},
    }
    cfg = build_config(
        {
            "model": model_section,
            "schedule": {"num_inference_steps": 4},
            "losses": {
                "structure": {"window": [0, 1], "weight": 1.0},
                "reward": {"window": [2, 3], "terms": [{"name": "gmsd", "weight": 1.0}]},
                "gram": {"window": [2, 3], "allow_random_vgg": True, "weight": 1.0},
            },
            "train": {"lr": 1e-3, "batch_size": 2},
        }
    )
    torch.manual_seed(0)
    state = build_state(cfg, build_model(cfg.model, 4), torch.device("cpu"))
    trained = dict(state.model.unet.named_parameters())
    assert all(("lora_" in name) == p.requires_grad for name, p in trained.items())
    frozen = {name: p.detach().clone() for name, p in trained.items() if "lora_" not in name}
    adapters = {name: p.detach().clone() for name, p in trained.items() if "lora_" in name}
    result = optimizer_step(state, [fixed_batch(32)], cfg)
    assert not result.skipped and math.isfinite(result.grad_norm) and result.grad_norm > 0
    after = dict(state.model.unet.named_parameters())
    assert all(torch.equal(after[name], p) for name, p in frozen.items())
    assert any(not torch.equal(after[name], p) for name, p in adapters.items())

    export = save_model(state.model, cfg.model, tmp_path / "model")
    assert json.loads((export / "rfsr_model.json").read_text())["builder"] == "lora_family:build"
    lr = fixed_batch(32).lr_image
    expected = state.model.sample(lr, 4, seeded(3))
    assert torch.allclose(load_model(export).sample(lr, 4, seeded(3)), expected, atol=1e-4)
