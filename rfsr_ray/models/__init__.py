"""Model families behind the `ISRDiffusionModel` protocol, chosen by `model.family`."""

from __future__ import annotations

import json
from pathlib import Path

from rfsr_ray.config import ModelConfig
from rfsr_ray.errors import WeightsError
from rfsr_ray.models.protocol import ISRDiffusionModel
from rfsr_ray.models.tiny import MODEL_INFO_FILE, TinySRModel, build_tiny

__all__ = ["ISRDiffusionModel", "build_model", "load_model", "save_model"]


def build_model(cfg: ModelConfig, scale: int, trainable: bool = True) -> ISRDiffusionModel:
    """The model named by `cfg.family`, from `cfg.pretrained` (or its default hub id), or for
    `tiny` initialised from config. `trainable=False` loads for inference only."""
    match cfg.family:
        case "tiny":
            return build_tiny(cfg, scale)
        case "sd_upscaler":
            from rfsr_ray.models.sd_upscaler import load_sd_upscaler

            return load_sd_upscaler(cfg, scale, trainable)
        case "controlnet_sr":
            from rfsr_ray.models.controlnet_sr import load_controlnet_sr

            return load_controlnet_sr(cfg, scale, trainable)
        case "seesr":
            from rfsr_ray.models.seesr.family import load_seesr

            return load_seesr(cfg, scale, trainable)
        case "plugin":
            from rfsr_ray.models.plugin import build_plugin

            return build_plugin(cfg, scale, trainable)
    raise AssertionError(cfg.family)  # unreachable: the schema limits `family`


def load_model(path: str | Path) -> ISRDiffusionModel:
    """Load any exported model folder (its family is recorded in rfsr_model.json)."""
    info_file = Path(path) / MODEL_INFO_FILE
    if not info_file.is_file():
        raise WeightsError(
            f"{str(path)!r} is not an exported rfsr_ray model (no {MODEL_INFO_FILE}); pass the "
            "`model/` folder of a finished run or a pretrain output"
        )
    info = json.loads(info_file.read_text())
    match info["family"]:
        case "tiny":
            return TinySRModel.from_pretrained(path)
        case "sd_upscaler" | "controlnet_sr" | "seesr":
            return _load_latent_export(Path(path), info)
        case "plugin":
            from rfsr_ray.models.plugin import load_plugin_export

            return load_plugin_export(Path(path), info)
    raise WeightsError(f"{str(path)!r} holds unknown model family {info['family']!r}")


def save_model(model: ISRDiffusionModel, cfg: ModelConfig, path: str | Path) -> Path:
    """`model.save(path)`, plus, for a plug-in family, the record of its builder and options
    in rfsr_model.json that `load_model` rebuilds it from."""
    path = Path(model.save(path))
    if cfg.family == "plugin":
        from rfsr_ray.models.plugin import write_plugin_record

        write_plugin_record(path, model, cfg, MODEL_INFO_FILE)
    return path


def _load_latent_export(path: Path, info: dict) -> ISRDiffusionModel:
    """A full export is a diffusers folder on its own; a LoRA export is adapters on the base
    model its config names."""
    from rfsr_ray.models.latent import full_export_config
    from rfsr_ray.models.lora import ADAPTER

    cfg = ModelConfig.model_validate(info["model_config"])
    if info["format"] == "full":
        return build_model(full_export_config(cfg, path), int(info["scale"]), trainable=False)
    model = build_model(cfg, int(info["scale"]), trainable=False)
    if (path / "pytorch_lora_weights.safetensors").is_file():
        weights = path / "pytorch_lora_weights.safetensors"
        model.unet.load_lora_adapter(str(weights), prefix="unet", adapter_name=ADAPTER)
    if (path / "controlnet_lora").is_dir():
        model.controlnet.load_lora_adapter(
            str(path / "controlnet_lora"),
            weight_name="pytorch_lora_weights.safetensors",
            prefix=None,
            adapter_name=ADAPTER,
        )
    return model
