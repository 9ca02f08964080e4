"""Checkpoint files: trainable and EMA weights (safetensors), optimiser, LR schedule, RNG states,
progress and the resolved config.

Layout of a checkpoint folder:
    trainable/<module>.safetensors   trainable tensors of each trained module (the module's own
                                     names, never a DDP wrapper's; frozen weights are not
                                     repeated, so a LoRA checkpoint holds only the adapters)
    ema.safetensors                  EMA shadow of the trainable parameters, in parameter order
    optimizer.pt, lr_scheduler.pt, rng.pt, grad_scaler.pt (fp16 only)
    progress.json                    step, skipped steps, data position, MLflow run id and the
                                     hash of the training-relevant config (`config_hash`)
    config.yaml                      the resolved config
    COMPLETE                         written last: the size of every other file (JSON); a folder
                                     without it, or with a file missing or short, is never loaded

Ray Train copies a reported checkpoint to storage file by file, in parallel threads, so the marker
can land on storage before the weights do: completeness is checked against the sizes it lists.

A rerun of a run name continues its newest checkpoint only when the training-relevant config is
unchanged (`config_changes`). These keys may change on resume (`RESUMABLE_KEYS`): how long to
train and how often to validate, checkpoint and log; how many workers and which resources; the
data stage's parallelism; tracking, the validation objective's weighting, and the sections other
pipelines read (output, prepare, eval, infer, tune).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from rfsr_ray.config import RFSRConfig
from rfsr_ray.errors import TrainingError
from rfsr_ray.tracking.mlflow_run import flatten

if TYPE_CHECKING:  # types only: the driver imports this module, and the models cost ~8 s
    from rfsr_ray.models.protocol import ISRDiffusionModel
    from rfsr_ray.train.step import TrainState

COMPLETE_MARKER = "COMPLETE"
LEGACY_MARKER = "ok\n"  # the marker's text before it listed file sizes

# Config keys (a trailing "." covers a whole section) that may differ between a checkpoint and
# the config that resumes it: none changes what one optimiser step computes. train.num_workers
# changes the effective batch (batch_size x grad_accum x num_workers) and each rank's noise
# stream, but scaling a cluster on resume is routine, so it is allowed with a warning
# (rfsr_ray.train.driver). output.* names the run folder (a moved folder still resumes) or
# configures pipelines/prepare_data.py.
RESUMABLE_KEYS = (
    "train.steps",
    "train.validate_every",
    "train.checkpoint_every",
    "train.log_every",
    "train.keep_checkpoints",
    "train.max_failures",
    "train.max_nonfinite_steps",
    "train.val_objective.",
    "train.num_workers",
    "train.cpus_per_worker",
    "train.gpus_per_worker",
    "train.use_gpu",
    "data.concurrency",
    "data.num_cpus",
    "model.pretrain_config",
    "tracking.",
    "output.",
    "prepare.",
    "eval.",
    "infer.",
    "tune.",
)


@dataclass
class Progress:
    step: int = 0
    skipped_steps: int = 0
    data_epoch: int = 0  # newest data epoch consumed; a resumed run starts at the next one
    run_id: str | None = None  # MLflow run to continue
    config_hash: str | None = None  # `config_hash` of the config that trained it (None: older)


def is_resumable_key(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)


def training_config(tree: dict[str, Any]) -> dict[str, Any]:
    """The training-relevant keys of a config dict (`cfg.to_dict()` or a loaded config.yaml),
    flattened to dotted names: everything except `RESUMABLE_KEYS`."""
    return {k: v for k, v in flatten(tree).items() if not is_resumable_key(k)}


def config_hash(cfg: RFSRConfig) -> str:
    """sha256 of the canonical JSON of `training_config(cfg)` (hex)."""
    canonical = json.dumps(training_config(cfg.to_dict()), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def config_changes(folder: Path, cfg: RFSRConfig) -> dict[str, tuple[Any, Any]]:
    """{key: (checkpoint's value, cfg's value)} of the training-relevant keys that differ between
    the complete checkpoint `folder` and `cfg`; {} when they match.

    A key the checkpoint's config lacks (written before the key existed) counts as its default,
    which keeps the earlier behaviour; a key `cfg` lacks (since removed) reads as None.
    """
    progress = read_progress(folder)
    if progress is not None and progress.config_hash == config_hash(cfg):
        return {}
    # No hash (an older checkpoint) or another one: name the keys from its saved config.yaml,
    # read as plain YAML so a checkpoint of an older schema still loads. Both sides go through
    # the same YAML round trip, so tuples and floats compare as the saved file holds them.
    saved = training_config(yaml.safe_load((folder / "config.yaml").read_text()) or {})
    new = training_config(yaml.safe_load(cfg.to_yaml()))
    old = {**training_config(yaml.safe_load(RFSRConfig().to_yaml())), **saved}
    return {
        key: (old.get(key), new.get(key))
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    }


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's trainable parameters by state-dict name, on the CPU."""
    return {
        name: parameter.detach().contiguous().cpu()
        for name, parameter in module.named_parameters()
        if parameter.requires_grad
    }


def save_checkpoint(folder: Path, state: TrainState, progress: Progress, cfg: RFSRConfig) -> Path:
    """Write a complete checkpoint into `folder` (created; must not exist).

    Files go to `folder.partial` first and the folder is renamed into place after the
    `COMPLETE` marker is written, so an interrupted save never looks like a checkpoint.
    """
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "trainable").mkdir(parents=True)
    for name, module in state.model.trainable_modules().items():
        save_file(trainable_state(module), partial / "trainable" / f"{name}.safetensors")
    shadow = {str(i): p.detach().contiguous().cpu() for i, p in enumerate(state.ema.shadow_params)}
    save_file(shadow, partial / "ema.safetensors")
    torch.save(state.optimizer.state_dict(), partial / "optimizer.pt")
    torch.save(state.lr_scheduler.state_dict(), partial / "lr_scheduler.pt")
    torch.save(_rng_state(state), partial / "rng.pt")
    if state.scaler is not None:
        torch.save(state.scaler.state_dict(), partial / "grad_scaler.pt")
    progress.step, progress.skipped_steps = state.step, state.skipped_steps
    progress.config_hash = config_hash(cfg)
    (partial / "progress.json").write_text(json.dumps(asdict(progress), indent=2))
    cfg.save(partial / "config.yaml")
    sizes = {
        path.relative_to(partial).as_posix(): path.stat().st_size
        for path in sorted(partial.rglob("*"))
        if path.is_file()
    }
    (partial / COMPLETE_MARKER).write_text(json.dumps({"files": sizes}, indent=2))
    partial.rename(folder)
    return folder


def is_complete(folder: Path) -> bool:
    """True when `folder` holds a whole checkpoint: its marker, and every file the marker lists
    at its listed size (a copy still in progress or cut short is not complete)."""
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return False
    text = marker.read_text()
    if text == LEGACY_MARKER:
        return True
    try:
        sizes = json.loads(text)["files"]
    except (ValueError, KeyError, TypeError):  # the marker itself is only partly copied
        return False
    return all(
        (folder / name).is_file() and (folder / name).stat().st_size == size
        for name, size in sizes.items()
    )


def latest_checkpoint(run_dir: Path) -> tuple[Path, Progress] | None:
    """The newest complete checkpoint folder under `run_dir` (by step), and its progress."""
    found = [(folder, read_progress(folder)) for folder in run_dir.glob("checkpoint_0*")]
    complete = [(folder, progress) for folder, progress in found if progress is not None]
    return max(complete, key=lambda item: item[1].step) if complete else None


def save_into_run(
    run_dir: Path, step: int, keep: int, state: TrainState, progress: Progress, cfg: RFSRConfig
) -> Path:
    """Write the checkpoint of `step` straight into `run_dir` (as `checkpoint_<step>`, where Ray
    would copy it) and keep only the newest `keep` there, as Ray's `num_to_keep` does. For
    Train's local mode (`train.num_workers=0`), whose `report` only remembers the folder it is
    given: without this a local run's checkpoints vanished with their scratch folder and a
    rerun started over."""
    folder = save_checkpoint(run_dir / f"checkpoint_{step:08d}", state, progress, cfg)
    found = sorted(run_dir.glob("checkpoint_0*"), key=lambda path: path.name)
    for old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _rng_state(state: TrainState) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy_global": np.random.get_state(),
        "python": random.getstate(),
        "index_rng": state.index_rng.bit_generator.state,
        "generator": state.generator.get_state(),
        "ema_optimization_step": state.ema.optimization_step,
    }


def load_checkpoint(folder: Path, state: TrainState) -> Progress:
    """Restore weights, EMA, optimiser, LR schedule and RNGs into `state`; returns progress."""
    if not is_complete(folder):
        raise TrainingError(
            f"checkpoint {folder} is incomplete (no {COMPLETE_MARKER} marker, or a file it lists "
            "is missing or short); delete it so the previous checkpoint is used"
        )
    device = state.params[0].device
    for name, module in state.model.trainable_modules().items():
        weights = load_file(folder / "trainable" / f"{name}.safetensors", device=str(device))
        expected = trainable_state(module).keys()
        if set(weights) != set(expected):
            raise TrainingError(
                f"checkpoint {folder} holds different trainable tensors for {name} than this "
                "model trains (model.finetune or model.lora changed?); resume with the config "
                "saved in the checkpoint"
            )
        module.load_state_dict(weights, strict=False)
    shadow = load_file(folder / "ema.safetensors", device=str(device))
    for index, parameter in enumerate(state.ema.shadow_params):
        parameter.data.copy_(shadow[str(index)])
    state.optimizer.load_state_dict(
        torch.load(folder / "optimizer.pt", map_location=device, weights_only=False)
    )
    state.lr_scheduler.load_state_dict(torch.load(folder / "lr_scheduler.pt", weights_only=False))
    if state.scaler is not None and (folder / "grad_scaler.pt").is_file():
        state.scaler.load_state_dict(torch.load(folder / "grad_scaler.pt", weights_only=False))
    rng = torch.load(folder / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy_global"])
    random.setstate(rng["python"])
    state.index_rng.bit_generator.state = rng["index_rng"]
    state.generator.set_state(rng["generator"])
    state.ema.optimization_step = rng["ema_optimization_step"]
    progress = Progress(**json.loads((folder / "progress.json").read_text()))
    state.step, state.skipped_steps = progress.step, progress.skipped_steps
    return progress


def read_progress(folder: Path) -> Progress | None:
    """Progress of a complete checkpoint folder, or None."""
    if not is_complete(folder):
        return None
    return Progress(**json.loads((folder / "progress.json").read_text()))


def model_from_checkpoint(folder: Path) -> ISRDiffusionModel:
    """The model of a training checkpoint with its EMA weights loaded (for inference)."""
    from rfsr_ray.config import load_config
    from rfsr_ray.models import build_model

    if not (folder / COMPLETE_MARKER).is_file():
        raise TrainingError(f"{folder} is not a complete checkpoint (no {COMPLETE_MARKER})")
    cfg = load_config(folder / "config.yaml")
    model = build_model(cfg.model, cfg.data.scale)
    shadow = load_file(folder / "ema.safetensors")
    parameters = model.trainable_parameters()
    if len(shadow) != len(parameters):
        raise TrainingError(
            f"checkpoint {folder} holds {len(shadow)} EMA tensors but the model "
            f"has {len(parameters)} trainable parameters; wrong model config?"
        )
    with torch.no_grad():
        for index, parameter in enumerate(parameters):
            parameter.copy_(shadow[str(index)])
    return model
