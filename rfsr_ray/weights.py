"""Every pretrained weight a config needs, resolved in one place.

Where each kind is looked for, in order:
- model folders (`model.pretrained` of the tiny family, `eval.models`): the configured path;
- diffusers models (`model.pretrained` and `model.controlnet_sr.controlnet` of the latent
  families): a local folder, else the hub id in the Hugging Face cache, else a download when the
  hub is reachable and `HF_HUB_OFFLINE` is unset (`rfsr_ray.hub`);
- VGG19 for the Gram regulariser: `losses.gram.vgg_weights`, then torchvision's cache
  `$TORCH_HOME/hub/checkpoints/vgg19-dcbb9e9d.pth` (unless `losses.gram.allow_random_vgg`);
- pyiqa metrics (rewards, held-out monitor metrics, evaluation metrics): pyiqa's cache
  (`$TORCH_HOME/hub/pyiqa`), torch hub's checkpoints and the Hugging Face cache (`$HF_HOME`; set
  `HF_HUB_OFFLINE=1` on air-gapped nodes). A metric counts as present when it builds.

`stage_env(dir)` lays those caches out under one folder, so a folder filled by
`pipelines/weights.py download` on a machine with network access can be synced to every node
and used there by pointing `TORCH_HOME` and `HF_HOME` at it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rfsr_ray import iqa
from rfsr_ray.config import RewardConfig, RFSRConfig
from rfsr_ray.errors import WeightsError
from rfsr_ray.hub import looks_local
from rfsr_ray.losses.gram import VGG19_URL, vgg19_file

# pyiqa metrics that load no pretrained file.
WEIGHT_FREE_METRICS = frozenset(
    ("psnr", "ssim", "fsim", "vsi", "gmsd", "nlpd", "mad", "vif", "cw_ssim", "piqe", "entropy")
)
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class WeightNeed:
    kind: Literal["model", "diffusers", "hub", "vgg19", "pyiqa"]
    name: str  # a folder, a hub id, a file name or a pyiqa metric name
    used_by: str  # the config key that asks for it
    revision: str | None = None  # hub revision (diffusers needs)


def weights_needed(cfg: RFSRConfig, scope: Literal["train", "all"] = "all") -> list[WeightNeed]:
    """What `cfg` needs (for training only, or also for evaluation), de-duplicated."""
    needs = _model_needs(cfg)
    losses = cfg.losses
    rfsr = cfg.train.loss == "rfsr"
    if rfsr and losses.gram.enabled and not losses.gram.allow_random_vgg:
        needs.append(WeightNeed("vgg19", "vgg19-dcbb9e9d.pth", "losses.gram"))
    if rfsr and losses.reward.enabled:
        for term in losses.reward.terms:
            needs += _reward_needs(term)
    needs += [WeightNeed("pyiqa", n, "losses.monitor.held_out") for n in cfg.held_out_metrics()]
    if scope == "all":
        needs += [WeightNeed("model", m.path, f"eval.models {m.name}") for m in cfg.eval.models]
    if scope == "all" and cfg.eval.models:
        needs += [WeightNeed("pyiqa", n, "eval.metrics") for n in cfg.eval.metrics]
    unique: dict[tuple[str, str], WeightNeed] = {}
    for need in needs:
        if not (need.kind == "pyiqa" and need.name in WEIGHT_FREE_METRICS):
            unique.setdefault((need.kind, need.name), need)
    return list(unique.values())


def _model_needs(cfg: RFSRConfig) -> list[WeightNeed]:
    model = cfg.model
    plugin_folder = model.pretrained is None or looks_local(model.pretrained)
    if model.family == "tiny" or (model.family == "plugin" and plugin_folder):
        # (a plug-in builder may also take a hub id: then it is a diffusers-style need below)
        if model.pretrained and model.pretrain_config is None:
            return [WeightNeed("model", model.pretrained, "model.pretrained")]
        return []
    if model.family == "plugin":
        return [WeightNeed("diffusers", model.pretrained, "model.pretrained", model.revision)]
    assert model.source is not None  # every latent family has one (schema)
    needs = [WeightNeed("diffusers", model.source, "model.pretrained", model.revision)]
    if model.family == "controlnet_sr" and model.controlnet_sr.controlnet:
        needs.append(
            WeightNeed(
                "diffusers", model.controlnet_sr.controlnet, "model.controlnet_sr.controlnet"
            )
        )
    return needs


def _reward_needs(term: RewardConfig) -> list[WeightNeed]:
    if term.name != "imagereward":
        return [WeightNeed("pyiqa", term.name, "losses.reward.terms")]
    from rfsr_ray.losses.imagereward import HUB_REPO, TOKENIZER_REPO

    key = "losses.reward.terms[imagereward]"
    return [
        WeightNeed("hub", term.weights or HUB_REPO, f"{key}.weights"),
        WeightNeed("hub", term.tokenizer or TOKENIZER_REPO, f"{key}.tokenizer"),
    ]


def why_missing(need: WeightNeed, cfg: RFSRConfig) -> str | None:
    """None when `need` is present here, else how to provide it."""
    if need.kind == "model":
        if Path(need.name).exists():
            return None
        return f"folder {need.name} does not exist; copy the model folder there"
    if need.kind in ("diffusers", "hub"):
        from rfsr_ray.hub import why_unavailable

        if Path(need.name).expanduser().is_file():  # an explicit checkpoint file
            return None
        return why_unavailable(need.name, need.revision, need.used_by)
    if need.kind == "vgg19":
        path = vgg19_file(cfg.losses.gram.vgg_weights)
        if path.is_file():
            return None
        return (
            f"{path} not found; download {VGG19_URL} (or run pipelines/weights.py download) and "
            "copy it there, set losses.gram.vgg_weights, or allow_random_vgg=true"
        )
    try:
        iqa.create_metric(need.name)
    except WeightsError as error:
        reason = str(error).removeprefix(f"pyiqa metric {need.name!r} ")
        return (
            f"pyiqa metric {need.name} does not build offline: {reason}. Stage it with "
            "pipelines/weights.py download and point $TORCH_HOME / "
            "$HF_HOME at the staged folder"
        )
    return None


def require_weights(cfg: RFSRConfig, where: str = "") -> None:
    """Raise one WeightsError listing every weight training needs and cannot find here."""
    needs = weights_needed(cfg, "train")
    missing = [(need, why) for need in needs if (why := why_missing(need, cfg))]
    if missing:
        lines = "\n".join(f"  - {need.used_by}: {why}" for need, why in missing)
        place = f" on {where}" if where else ""
        raise WeightsError(f"{len(missing)} pretrained weight(s) missing{place}:\n{lines}")


def stage_env(directory: Path, offline: bool) -> dict[str, str]:
    """Environment that makes torch hub, pyiqa and Hugging Face use caches under `directory`."""
    env = {"TORCH_HOME": str(directory / "torch"), "HF_HOME": str(directory / "huggingface")}
    if offline:
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _files(directory: Path) -> Iterable[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> Path:
    """Record every staged file's size and SHA-256, for `verify_manifest` on the other side."""
    entries = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
               for p in _files(directory)}  # fmt: skip
    path = directory / MANIFEST
    path.write_text(json.dumps(entries, indent=1, sort_keys=True))
    return path


def verify_manifest(directory: Path) -> list[str]:
    """Problems with a staged folder: no manifest, missing files, changed files."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return [f"{manifest} missing: stage the folder with pipelines/weights.py download"]
    problems = []
    for name, entry in json.loads(manifest.read_text()).items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
            problems.append(f"{name}: checksum differs from the manifest (corrupt or partial copy)")
    return problems


def fetch(need: WeightNeed, cfg: RFSRConfig) -> None:
    """Download one need into the caches the environment points at (network required)."""
    if need.kind in ("diffusers", "hub"):
        from rfsr_ray.hub import resolve

        resolve(need.name, need.revision, need.used_by)  # into $HF_HOME's hub cache
    elif need.kind == "vgg19":
        from torch.hub import download_url_to_file

        target = vgg19_file(None)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_file():
            download_url_to_file(VGG19_URL, str(target))
    elif need.kind == "pyiqa":
        iqa.create_metric(need.name)  # pyiqa downloads what the metric needs into its caches


def block_downloads() -> None:
    """Make every torch hub / pyiqa download fail at once (for `verify`, which must only look
    at what is staged, even on a machine that has network access)."""
    import torch.hub
    from pyiqa.utils import download_util

    def refuse(url: str, *args: object, **kwargs: object) -> None:
        raise WeightsError(f"not staged (verify never downloads): {url}")

    torch.hub.download_url_to_file = refuse
    download_util.download_url_to_file = refuse
