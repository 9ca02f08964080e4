"""Model families behind the `ISRDiffusionModel` protocol, chosen by `model.family`."""

from __future__ import annotations

import json
from pathlib import Path

from rfsr_ray.config import ModelConfig
from rfsr_ray.errors import WeightsError
from rfsr_ray.models.protocol import ISRDiffusionModel
from rfsr_ray.models.tiny import MODEL_INFO_FILE, TinySRModel, build_tiny

__all__ = ["ISRDiffusionModel", "build_model", "load_model"]


def build_model(cfg: ModelConfig, scale: int) -> ISRDiffusionModel:
    """The model named by `cfg.family`, from `cfg.pretrained` or initialised from config."""
    match cfg.family:
        case "tiny":
            return build_tiny(cfg, scale)
    raise AssertionError(cfg.family)  # unreachable: the schema limits `family`


def load_model(path: str | Path) -> ISRDiffusionModel:
    """Load any exported model folder (its family is recorded in rfsr_model.json)."""
    info_file = Path(path) / MODEL_INFO_FILE
    if not info_file.is_file():
        raise WeightsError(
            f"{str(path)!r} is not an exported rfsr_ray model (no {MODEL_INFO_FILE}); pass the "
            "`model/` folder of a finished run or a pretrain output"
        )
    family = json.loads(info_file.read_text())["family"]
    match family:
        case "tiny":
            return TinySRModel.from_pretrained(path)
    raise WeightsError(f"{str(path)!r} holds unknown model family {family!r}")
