"""Tiny randomly initialised Stable Diffusion components for each latent family, at the sizes
diffusers' own pipeline tests use, saved as a diffusers folder so they load through exactly the
path real weights take. For tests and smoke runs only: their outputs are noise.

The tokenizer is a byte-level CLIP BPE vocabulary without merges, written here because the tiny
tokenizer diffusers tests use (`hf-internal-testing/tiny-random-clip`) would need the hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionUpscalePipeline,
    UNet2DConditionModel,
)

Family = Literal["sd_upscaler", "controlnet_sr", "seesr"]
# Where a tiny SeeSR folder keeps its tagger files (the configs name them under model.seesr).
TINY_TAGGER = {
    "ram": "tagger/ram_swin_large_14m.pth",
    "dape": "tagger/DAPE.pth",
    "tag_list": "tagger/tags.txt",
    "tag_thresholds": "tagger/thresholds.txt",
}
TINY_TAGS = ("sky", "tree", "building", "person", "water", "grass")


def _byte_symbols() -> list[str]:
    """CLIP's byte → printable-unicode table (the GPT-2 byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def tiny_tokenizer(max_length: int = 77) -> object:
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_text_encoder(tokenizer: object) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=1000,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="gelu",
        projection_dim=512,
    )
    return CLIPTextModel(config)


def tiny_sd_upscaler(seed: int = 0) -> StableDiffusionUpscalePipeline:
    """diffusers' StableDiffusionUpscalePipelineFastTests components (v-prediction DDIM)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=7,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        use_linear_projection=True,
        only_cross_attention=(True, True, False),
        num_class_embeds=100,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        latent_channels=4,
        scaling_factor=0.08333,
    )
    tokenizer = tiny_tokenizer()
    scheduler = DDIMScheduler(
        prediction_type="v_prediction",
        beta_schedule="scaled_linear",
        beta_start=0.0001,
        beta_end=0.02,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=tiny_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=unet,
        low_res_scheduler=DDPMScheduler(),
        scheduler=scheduler,
        max_noise_level=350,
    )


def tiny_controlnet_sd(seed: int = 0) -> StableDiffusionControlNetPipeline:
    """diffusers' ControlNetPipelineFastTests components (ε-prediction DDIM, VAE factor 2)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=1,
    )
    controlnet = ControlNetModel(
        block_out_channels=(4, 8),
        layers_per_block=2,
        in_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=32,
        conditioning_embedding_out_channels=(16, 32),
        norm_num_groups=1,
    )
    # A fresh ControlNet's output convolutions are zero, so nothing behind them would get a
    # gradient; a released ControlNet has trained ones. Give the tiny one small random ones.
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0.0, 0.05)
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=2,
    )
    tokenizer = tiny_tokenizer()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
    )
    return StableDiffusionControlNetPipeline(
        vae=vae,
        text_encoder=tiny_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=unet,
        controlnet=controlnet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_seesr(folder: Path, seed: int = 0) -> Path:
    """A tiny SeeSR folder laid out as released: the tiny ControlNet pipeline's SD parts, a
    SeeSRUNet and its ControlNet (image attention on) in unet/ and controlnet/, and the tiny
    DAPE tagger's files in RAM's released layout under tagger/ (`TINY_TAGGER`)."""
    from rfsr_ray.models.seesr import SeeSRControlNet, SeeSRUNet

    pipeline = tiny_controlnet_sd(seed)
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
        getattr(pipeline, name).save_pretrained(folder / name)
    config = {k: v for k, v in pipeline.unet.config.items() if not k.startswith("_")}
    unet = SeeSRUNet.from_config({**config, "use_image_cross_attention": True})
    controlnet = SeeSRControlNet.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():  # trained-looking output convolutions, as for controlnet_sr
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0.0, 0.05)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    controlnet.save_pretrained(folder / "controlnet", safe_serialization=True)
    save_tiny_tagger(folder, seed)
    return folder


def save_tiny_tagger(folder: Path, seed: int = 0) -> None:
    """Random tiny DAPE tagger weights written as the released files are: RAM's entries in
    {"model": ...} under RAM's names, DAPE's LoRA factors (lora_B zero) in a flat file."""
    from rfsr_ray.models.seesr.tagger import TagList, build_dape_tagger, lora_sites, tiny_config

    torch.manual_seed(seed)
    tagger = build_dape_tagger(tiny_config(), TagList(TINY_TAGS, (0.5,) * len(TINY_TAGS)))
    ram = {released_ram_name(k): v.clone() for k, v in tagger.state_dict().items()}
    dape = {}
    for site in lora_sites(tagger):
        module = released_ram_name(site).removesuffix(".weight")
        weight = tagger.get_parameter(site)
        groups = 2 if site.endswith("attn.qkv.weight") else 1  # SeeSR's MergedLinear adapts q, v
        rows = weight.shape[0] // 3 if groups == 2 else weight.shape[0]
        dape[f"{module}.lora_A"] = 0.01 * torch.randn(groups * 4, weight.shape[1])
        dape[f"{module}.lora_B"] = torch.zeros(groups * rows, 4)
    (folder / "tagger").mkdir(parents=True, exist_ok=True)
    torch.save({"model": ram}, folder / TINY_TAGGER["ram"])
    torch.save(dape, folder / TINY_TAGGER["dape"])
    (folder / TINY_TAGGER["tag_list"]).write_text("\n".join(TINY_TAGS) + "\n")
    (folder / TINY_TAGGER["tag_thresholds"]).write_text("0.5\n" * len(TINY_TAGS))


def released_ram_name(name: str) -> str:
    """Our tagger's name as RAM's checkpoint spells it (`tagger.our_name` reversed)."""
    import re

    merge = re.match(r"visual_encoder\.layers\.(\d+)\.downsample\.(.+)$", name)
    if merge:
        return f"visual_encoder.layers.{int(merge[1]) - 1}.downsample.{merge[2]}"
    return re.sub(r"^tagging_head\.(\d+)\.", r"tagging_head.encoder.layer.\1.", name)


def save_tiny_components(family: Family, folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random diffusers folder for `family` (controlnet/ included for ControlNet;
    SeeSR's released layout with its tagger files for seesr)."""
    folder = Path(folder)
    if family == "seesr":
        return save_tiny_seesr(folder, seed)
    pipeline = tiny_sd_upscaler(seed) if family == "sd_upscaler" else tiny_controlnet_sd(seed)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder
