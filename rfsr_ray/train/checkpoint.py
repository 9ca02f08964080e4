"""Checkpoint files: trainable and EMA weights (safetensors), optimiser, LR schedule, RNG states,
progress and the resolved config.

Layout of a checkpoint folder:
    trainable/<module>.safetensors   trainable tensors of each trained module (unwrapped from DDP;
                                     frozen weights are not repeated, so a LoRA checkpoint holds
                                     only the adapters)
    ema.safetensors                  EMA shadow of the trainable parameters, in parameter order
    optimizer.pt, lr_scheduler.pt, rng.pt, grad_scaler.pt (fp16 only)
    progress.json                    step, skipped steps, data position, MLflow run id
    config.yaml                      the resolved config
    COMPLETE                         written last: a folder without it is never loaded
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rfsr_ray.config import RFSRConfig
from rfsr_ray.errors import TrainingError
from rfsr_ray.models.protocol import ISRDiffusionModel
from rfsr_ray.train.step import TrainState

COMPLETE_MARKER = "COMPLETE"


@dataclass
class Progress:
    step: int = 0
    skipped_steps: int = 0
    data_epoch: int = 0  # newest data epoch consumed; a resumed run starts at the next one
    run_id: str | None = None  # MLflow run to continue


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return getattr(module, "module", module)


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's trainable parameters by state-dict name, on the CPU."""
    return {
        name: parameter.detach().contiguous().cpu()
        for name, parameter in unwrap(module).named_parameters()
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
    (partial / "progress.json").write_text(json.dumps(asdict(progress), indent=2))
    cfg.save(partial / "config.yaml")
    (partial / COMPLETE_MARKER).write_text("ok\n")
    partial.rename(folder)
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
    if not (folder / COMPLETE_MARKER).is_file():
        raise TrainingError(
            f"checkpoint {folder} is incomplete (no {COMPLETE_MARKER} marker); delete it so the "
            "previous checkpoint is used"
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
        unwrap(module).load_state_dict(weights, strict=False)
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
    if not (folder / COMPLETE_MARKER).is_file():
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
