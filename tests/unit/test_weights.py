"""The one weights mechanism: what a config needs, where it is looked for, the staged-folder
manifest, and pipelines/weights.py list / verify."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import vgg19

from pipelines import weights as weights_pipeline
from rfsr_ray.config import build_config, with_absolute_paths
from rfsr_ray.errors import WeightsError
from rfsr_ray.losses.gram import VGGFeatures
from rfsr_ray.weights import (
    require_weights,
    verify_manifest,
    weights_needed,
    why_missing,
    write_manifest,
)

CFG = {
    "schedule": {"num_inference_steps": 4},
    "losses": {
        "structure": {"window": [0, 1]},
        "reward": {"window": [2, 3], "terms": [{"name": "gmsd"}, {"name": "lpips"}]},
        "gram": {"window": [3, 3]},
    },
}


def test_needs_list_vgg_and_weighted_metrics_but_not_weight_free_ones(tmp_path):
    cfg = build_config({**CFG, "eval": {"models": [{"name": "m", "path": str(tmp_path)}],
                                         "metrics": ["psnr", "musiq"]}})  # fmt: skip
    needs = {(n.kind, n.name, n.used_by) for n in weights_needed(cfg)}
    assert needs == {
        ("vgg19", "vgg19-dcbb9e9d.pth", "losses.gram"),
        ("pyiqa", "lpips", "losses.reward.terms"),
        ("model", str(tmp_path), "eval.models m"),
        ("pyiqa", "musiq", "eval.metrics"),
    }
    assert {n.name for n in weights_needed(cfg, "train")} == {"vgg19-dcbb9e9d.pth", "lpips"}
    random_vgg = build_config({**CFG, "losses": {**CFG["losses"], "gram": {
        "window": [3, 3], "allow_random_vgg": True}}})  # fmt: skip
    assert "vgg19-dcbb9e9d.pth" not in {n.name for n in weights_needed(random_vgg)}


def test_vgg_is_found_in_torch_home_and_loaded(tmp_path, monkeypatch):
    cfg = build_config(CFG)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    vgg_need = next(n for n in weights_needed(cfg) if n.kind == "vgg19")
    assert "not found" in why_missing(vgg_need, cfg)
    target = tmp_path / "torch" / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    target.parent.mkdir(parents=True)
    torch.manual_seed(3)
    state = vgg19(weights=None).state_dict()  # a stand-in with the real layout
    torch.save(state, target)
    assert why_missing(vgg_need, cfg) is None
    features = VGGFeatures(cfg.losses.gram)
    assert not features.random_weights
    assert torch.equal(features.trunk[0].weight, state["features.0.weight"])


def test_require_weights_lists_every_missing_weight_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import pyiqa

    def offline(name, *args, **kwargs):
        raise OSError(f"no weights for {name} offline")

    monkeypatch.setattr(pyiqa, "create_metric", offline)
    cfg = build_config({**CFG, "model": {"pretrained": str(tmp_path / "no_model")}})
    with pytest.raises(WeightsError) as error:
        require_weights(cfg, where="rank 0")
    text = str(error.value)
    assert "3 pretrained weight(s) missing on rank 0" in text
    assert "model.pretrained" in text and "losses.gram" in text and "lpips" in text


def test_manifest_detects_missing_and_changed_files(tmp_path):
    (tmp_path / "torch" / "hub").mkdir(parents=True)
    (tmp_path / "torch" / "hub" / "a.pth").write_bytes(b"weights" * 100)
    (tmp_path / "b.bin").write_bytes(b"more")
    write_manifest(tmp_path)
    assert verify_manifest(tmp_path) == []
    (tmp_path / "b.bin").write_bytes(b"mork")
    (tmp_path / "torch" / "hub" / "a.pth").unlink()
    problems = verify_manifest(tmp_path)
    assert any("a.pth: missing" in p for p in problems)
    assert any("b.bin: checksum differs" in p for p in problems)
    assert "manifest.json missing" in verify_manifest(tmp_path / "torch")[0]


def test_weights_pipeline_lists_and_verifies_a_complete_and_an_incomplete_folder(tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    build_config(CFG).save(config)
    assert weights_pipeline.main(["list", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "vgg19-dcbb9e9d.pth" in out and "lpips" in out and "gmsd" not in out

    staged = tmp_path / "staged"
    target = staged / "torch" / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    target.parent.mkdir(parents=True)
    torch.save(vgg19(weights=None).state_dict(), target)
    write_manifest(staged)
    only_vgg = ["losses.reward.terms=[{name: gmsd}]"]
    args = ["verify", "--config", str(config), "--dir", str(staged), *only_vgg]
    assert weights_pipeline.main(args) == 0
    assert "0 problem(s)" in capsys.readouterr().out

    # lpips is not staged (and cannot be fetched here); the VGG file is removed: one verify
    # (a child process importing pyiqa, ~5 s) names both.
    target.unlink()
    assert weights_pipeline.main(["verify", "--config", str(config), "--dir", str(staged)]) == 1
    out = capsys.readouterr().out
    assert "MISSING losses.reward.terms lpips" in out
    assert "MISSING losses.gram vgg19-dcbb9e9d.pth" in out and "checkpoints/vgg19" in out


def test_hub_id_of_a_latent_family_resolves_from_a_staged_cache_offline(tmp_path, monkeypatch):
    """A node with a synced Hugging Face cache and HF_HUB_OFFLINE=1 finds a hub id there."""
    from huggingface_hub import constants

    from rfsr_ray.models import build_model
    from rfsr_ray.testing.tiny_components import save_tiny_components

    cache = tmp_path / "huggingface" / "hub"
    repo, commit = cache / "models--acme--tiny-upscaler", "0123456789abcdef" * 2 + "01234567"
    save_tiny_components("sd_upscaler", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = build_config(
        {
            "model": {"family": "sd_upscaler", "pretrained": "acme/tiny-upscaler"},
            "losses": {"gram": {"allow_random_vgg": True}},
        }
    )
    assert with_absolute_paths(cfg).model.pretrained == "acme/tiny-upscaler"  # not a path
    need = weights_needed(cfg, "train")[0]
    assert (need.kind, need.name) == ("diffusers", "acme/tiny-upscaler")
    assert why_missing(need, cfg) is None
    require_weights(cfg)
    assert build_model(cfg.model, 4, trainable=False).unet.config.in_channels == 7
    other = build_config({"model": {"family": "sd_upscaler", "pretrained": "acme/absent"}})
    problem = why_missing(weights_needed(other, "train")[0], other)
    assert "acme/absent" in problem and "HF_HUB_OFFLINE" in problem
