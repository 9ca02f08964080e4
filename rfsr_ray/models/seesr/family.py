"""The `seesr` family: SeeSR (github.com/cswry/SeeSR) behind `ISRDiffusionModel`.

Stable Diffusion 2 base parts (VAE, text encoder, tokenizer, scheduler) from `model.pretrained`;
SeeSR's `unet/` and `controlnet/` (image cross-attention to the DAPE tagger's embeddings) from
`model.seesr.weights` (default: the same folder), both through the strict loaders. Sampling is
SeeSR's pipeline (`pipelines/pipeline_seesr.py`, `start_point='lr'`): x_T is the VAE latent of the
bicubic-upsampled LR noised to T-1 (noise drawn first, then the posterior sample, as it does);
with guidance the text embeddings are [negative; positive] and the image embeddings [ram; ram].

Tags and image embeddings: the training data carries them (the Ray Data tagger stage of
`rfsr_ray.train.tagging` adds `caption` and `image_embeds` columns); everywhere else (validation,
upscale.py, evaluate.py, the denoising loss) `condition` tags the LR input with the same tagger
(`load_configured_tagger`), so every path tags the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from rfsr_ray.config import ModelConfig
from rfsr_ray.config.schema import SeeSRConfig
from rfsr_ray.errors import WeightsError
from rfsr_ray.hub import require_component, resolve
from rfsr_ray.models.controlnet_sr import ControlNetSRModel
from rfsr_ray.models.latent import LatentCondition, Mode
from rfsr_ray.models.lora import merged_copy
from rfsr_ray.models.sd_components import load_scheduler, load_text_parts, load_vae
from rfsr_ray.models.seesr.controlnet import load_seesr_controlnet
from rfsr_ray.models.seesr.tagger import DAPETagger, load_dape_tagger, released_config, tiny_config
from rfsr_ray.models.seesr.unet import load_seesr_unet
from rfsr_ray.models.tiny import MODEL_INFO_FILE

SD_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")
# The tagger's files (model.seesr fields) and what each is, for the error when one is missing.
TAGGER_FILES = {
    "ram": "RAM's Swin-L tagging model (ram_swin_large_14m.pth)",
    "dape": "SeeSR's DAPE LoRA weights over RAM (DAPE.pth)",
    "tag_list": "the tagger's tag list",
    "tag_thresholds": "the tagger's tag thresholds",
}


def load_configured_tagger(cfg: SeeSRConfig, device: torch.device | str = "cpu") -> DAPETagger:
    """The DAPE tagger `cfg` names (RAM's file, DAPE.pth over it), frozen, in eval mode."""
    assert cfg.ram is not None and cfg.dape is not None  # the schema requires both for seesr
    sizes = tiny_config() if cfg.tagger_size == "tiny" else released_config()
    tag_list = Path(cfg.tag_list) if cfg.tag_list else None
    thresholds = Path(cfg.tag_thresholds) if cfg.tag_thresholds else None
    return load_dape_tagger(cfg.ram, cfg.dape, tag_list, thresholds, sizes, device)


def tagger_record(cfg: SeeSRConfig) -> dict[str, str | None]:
    """The tagger `cfg` names, its files as absolute paths (None: RAM's list shipped with
    rfsr_ray), and `tagger_size`: what an export records instead of copying RAM and DAPE."""
    files = {name: getattr(cfg, name) for name in TAGGER_FILES}
    record = {k: str(Path(v).expanduser().absolute()) if v else None for k, v in files.items()}
    return {**record, "tagger_size": cfg.tagger_size}


def check_tagger_files(cfg: SeeSRConfig) -> None:
    """Raise WeightsError for the first tagger file `cfg` names that does not exist."""
    for name, what in TAGGER_FILES.items():
        value = getattr(cfg, name)
        if value and not Path(value).expanduser().is_file():
            raise WeightsError(
                f"model.seesr.{name}={value!r} does not exist; it is {what}. A seesr export "
                f"names the tagger it was trained with in its {MODEL_INFO_FILE} "
                f"(model_config.seesr.{name}) instead of copying it: put the file back there "
                "or edit that path to where the file is now"
            )


def compose_prompt(tags: str, text: str, added: str) -> str:
    """SeeSR's prompt, character for character (test_seesr.py): f"{tags}, {text}," + added."""
    return f"{tags}, {text}," + added


class SeeSRModel(ControlNetSRModel):
    family = "seesr"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.tagger: DAPETagger | None = None  # loaded on first use: training data brings tags

    def part_parameters(self, part: str) -> list[nn.Parameter]:
        if part == "unet_image_attention":  # SeeSR's `image_attentions` of every UNet block
            return [p for n, p in self.unet.named_parameters() if ".image_attentions." in n]
        return super().part_parameters(part)

    def train(self, mode: bool = True) -> SeeSRModel:
        super().train(mode)
        if self.tagger is not None:
            self.tagger.eval()  # frozen, never in training mode
        return self

    def tag(self, lr_image: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """lr_image (B, 3, h, w) in [0, 1] → (B tag strings, (B, N, 512) image embeddings)."""
        if self.tagger is None:
            self.tagger = load_configured_tagger(self.cfg.seesr, self.device)
        tagged = self.tagger.tag(lr_image.float())
        return tagged.captions, tagged.image_embeds

    def condition(
        self,
        lr_image: torch.Tensor,
        generator: torch.Generator | None = None,
        prompts: list[str] | None = None,
        mode: Mode = "sample",
        image_embeds: torch.Tensor | None = None,
    ) -> LatentCondition:
        """`prompts` are the tags of each LR image and `image_embeds` (B, N, 512) their
        embeddings, as the data's tagger stage made them; None: tag `lr_image` here."""
        batch = lr_image.shape[0]
        if prompts is None or image_embeds is None:
            tags, tagged_embeds = self.tag(lr_image)
            prompts = tags if prompts is None else prompts
            image_embeds = tagged_embeds if image_embeds is None else image_embeds
        settings = self.cfg.prompt
        texts = [compose_prompt(t, settings.text, self.cfg.seesr.added_prompt) for t in prompts]
        embeds, guidance = self.prompt_embeds(texts, batch, generator, mode)
        control = self.control_image(lr_image, embeds.dtype)
        copies = 2 if guidance > 1 else 1  # SeeSR repeats the image embeddings: [ram; ram]
        image_embeds = image_embeds.to(self.device, embeds.dtype)
        return LatentCondition(
            batch,
            embeds,
            torch.cat([control] * copies),
            guidance,
            control=control,
            image_embeds=torch.cat([image_embeds] * copies),
        )

    def start_latent(
        self, condition: LatentCondition, generator: torch.Generator | None
    ) -> torch.Tensor:
        """x_T (B, C, H/f, W/f): each sample's LR latent noised to T-1, SeeSR's draw order (the
        noise, then the VAE posterior sample). Two deliberate differences from SeeSR's pipeline:
        it noises sample 0's LR latent for the whole batch, here each sample gets its own; and
        it draws the posterior sample from torch's global RNG, here from `generator`, so the
        generator alone fixes a sample (every image's seed in upscale.py and validation)."""
        assert condition.control is not None  # built by `condition`
        dtype = condition.prompt_embeds.dtype
        height, width = (s // self.vae_scale_factor for s in condition.control.shape[-2:])
        shape = (condition.batch_size, self.vae.config.latent_channels, height, width)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
        clean = self.encode(condition.control, generator).to(dtype)
        final = self.scheduler.config.num_train_timesteps - 1
        timestep = torch.full((condition.batch_size,), final, dtype=torch.long, device=self.device)
        return self.scheduler.add_noise(clean, noise, timestep)

    @property
    def conditioning_scale(self) -> float:
        return self.cfg.seesr.conditioning_scale

    def _denoiser_kwargs(self, condition: LatentCondition, dtype: torch.dtype) -> dict:
        """SeeSR's image cross-attention input, (B or 2B, N, 512), to ControlNet and UNet alike."""
        assert condition.image_embeds is not None  # built by `condition`
        return {"image_encoder_hidden_states": condition.image_embeds.to(dtype)}

    def pipeline(self, merged: bool = True) -> object:
        raise NotImplementedError(
            "SeeSR has no diffusers pipeline; its export is a folder laid out as SeeSR's release "
            "(vae/, text_encoder/, tokenizer/, scheduler/, unet/, controlnet/)"
        )

    def info(self, export_format: str) -> dict:
        """The export record; its model_config.seesr names the tagger files by absolute path,
        so the export reloads (and tags) with the tagger it was trained with."""
        info = super().info(export_format)
        info["model_config"]["seesr"].update(tagger_record(self.cfg.seesr))
        return info

    def save(self, path: str | Path) -> Path:
        """SeeSR's layout: SD 2 parts plus unet/ and controlnet/ (LoRA merged), or LoRA adapters
        on the base named in rfsr_model.json (`lora.merge_on_export: false`). The tagger's large
        files are not copied: rfsr_model.json names them (`info`)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.cfg.finetune_mode == "lora" and not self.cfg.lora.merge_on_export:
            self.save_lora(path)
            export_format = "lora"
        else:
            with self._text_encoder_loaded():
                parts = {name: getattr(self, name) for name in SD_PARTS}
                parts |= {
                    "unet": merged_copy(self.unet),
                    "controlnet": merged_copy(self.controlnet),
                }
                for name, part in parts.items():
                    if name in ("tokenizer", "scheduler"):
                        part.save_pretrained(path / name)
                    else:
                        part.save_pretrained(path / name, safe_serialization=True)
            export_format = "full"
        (path / MODEL_INFO_FILE).write_text(json.dumps(self.info(export_format), indent=2))
        return path


def load_seesr(
    cfg: ModelConfig, scale: int, trainable: bool = True, key: str = "model.pretrained"
) -> SeeSRModel:
    """SD 2 base parts from `cfg.pretrained`, SeeSR's unet/ and controlnet/ from
    `cfg.seesr.weights` (or `cfg.pretrained`), each weight checked to be set exactly once."""
    assert cfg.pretrained is not None  # the schema requires it for this family
    check_tagger_files(cfg.seesr)  # here, not at the first validation hours into a run
    folder = resolve(cfg.pretrained, cfg.revision, key)
    weights_key = "model.seesr.weights" if cfg.seesr.weights else key
    weights = resolve(cfg.seesr.weights, None, weights_key) if cfg.seesr.weights else folder
    for part in ("unet", "controlnet"):
        if not (weights / part).is_dir():
            raise WeightsError(
                f"{weights_key}={str(weights)!r} has no {part}/ folder; point "
                "model.seesr.weights at SeeSR's released folder (it holds unet/ and controlnet/)"
            )
    text_encoder, tokenizer = load_text_parts(folder, key)
    return SeeSRModel(
        load_seesr_unet(weights / "unet"),
        load_vae(folder, key),
        text_encoder,
        tokenizer,
        load_scheduler(require_component(folder, "scheduler", key), cfg.sampler),
        cfg,
        scale,
        controlnet=load_seesr_controlnet(weights / "controlnet"),
        trainable=trainable,
    )
