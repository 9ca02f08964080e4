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

Family = Literal["sd_upscaler", "controlnet_sr"]


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


def save_tiny_components(family: Family, folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random diffusers folder for `family` (controlnet/ included for ControlNet)."""
    folder = Path(folder)
    pipeline = tiny_sd_upscaler(seed) if family == "sd_upscaler" else tiny_controlnet_sd(seed)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder
