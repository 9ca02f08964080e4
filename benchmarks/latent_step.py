"""RFSR step of each latent family: samples/s and peak GPU memory, full fine-tune vs LoRA.

    .venv/bin/python benchmarks/latent_step.py                  # GPU: real architectures, bf16
    .venv/bin/python benchmarks/latent_step.py --size tiny --device cpu --hr 32   # smoke run

`--size real` builds the released architectures (SD x4 upscaler; SD 2 base + a ControlNet made
from its UNet) from their configs with random weights: speed and memory do not depend on weight
values, and nothing is downloaded. `--pretrained FOLDER` loads real weights instead. The step is
the reference one (METHOD.md): 50 sampler steps, trajectory mode, indices drawn from the windows
0-19 and 40-49, bf16 autocast with fp32 master weights, batch 1, gradient checkpointing on.
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DDPMScheduler,
    UNet2DConditionModel,
)

from rfsr_ray.config import build_config
from rfsr_ray.models import build_model
from rfsr_ray.models.controlnet_sr import ControlNetSRModel
from rfsr_ray.models.sd_upscaler import SDUpscalerModel
from rfsr_ray.testing.tiny_components import tiny_controlnet_sd, tiny_sd_upscaler, tiny_tokenizer
from rfsr_ray.train.step import Batch, autocast_for, build_state, optimizer_step

UPSCALER_UNET = {  # stabilityai/stable-diffusion-x4-upscaler unet/config.json
    "block_out_channels": (256, 512, 512, 1024),
    "attention_head_dim": 8,
    "cross_attention_dim": 1024,
    "down_block_types": ("DownBlock2D", *["CrossAttnDownBlock2D"] * 3),
    "up_block_types": (*["CrossAttnUpBlock2D"] * 3, "UpBlock2D"),
    "in_channels": 7,
    "out_channels": 4,
    "num_class_embeds": 1000,
    "only_cross_attention": (True, True, True, False),
    "use_linear_projection": True,
    "sample_size": 128,
}
SD2_UNET = {  # stabilityai/stable-diffusion-2-base unet/config.json
    "block_out_channels": (320, 640, 1280, 1280),
    "attention_head_dim": (5, 10, 20, 20),
    "cross_attention_dim": 1024,
    "down_block_types": (*["CrossAttnDownBlock2D"] * 3, "DownBlock2D"),
    "up_block_types": ("UpBlock2D", *["CrossAttnUpBlock2D"] * 3),
    "use_linear_projection": True,
    "sample_size": 64,
}


def text_encoder() -> torch.nn.Module:
    """OpenCLIP ViT-H's text tower, as SD 2 and the upscaler use it."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_attention_heads=16,
        num_hidden_layers=23,
        projection_dim=1024,
        hidden_act="gelu",
        vocab_size=49408,
    )
    return CLIPTextModel(config)


def vae(blocks: int, scaling_factor: float) -> AutoencoderKL:
    channels = [128, 256, 512, 512][:blocks]
    return AutoencoderKL(
        block_out_channels=channels,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        latent_channels=4,
        layers_per_block=2,
        scaling_factor=scaling_factor,
    )


def real_model(family: str, cfg) -> torch.nn.Module:
    if family == "sd_upscaler":
        scheduler = DDIMScheduler(
            prediction_type="v_prediction", beta_schedule="scaled_linear", set_alpha_to_one=False
        )
        parts = (UNet2DConditionModel(**UPSCALER_UNET), vae(3, 0.08333), text_encoder())
        return SDUpscalerModel(
            *parts, tiny_tokenizer(), scheduler, cfg.model, 4, low_res_scheduler=DDPMScheduler()
        )
    unet = UNet2DConditionModel(**SD2_UNET)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return ControlNetSRModel(
        unet,
        vae(4, 0.18215),
        text_encoder(),
        tiny_tokenizer(),
        scheduler,
        cfg.model,
        4,
        controlnet=ControlNetModel.from_unet(unet),
    )


def tiny_model(family: str, cfg) -> torch.nn.Module:
    pipe = tiny_sd_upscaler() if family == "sd_upscaler" else tiny_controlnet_sd()
    parts = (pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, cfg.model, 4)
    if family == "sd_upscaler":
        return SDUpscalerModel(*parts, low_res_scheduler=pipe.low_res_scheduler)
    return ControlNetSRModel(*parts, controlnet=pipe.controlnet)


def make_config(family: str, finetune: str, args: argparse.Namespace, **losses: object):
    """The reference step's config; `losses` adds keys to the `losses` section."""
    model = {
        "family": family,
        "pretrained": args.pretrained or "unused",
        "finetune": finetune,
        "lora": {"enabled": finetune == "lora", "rank": 16},
        "memory": {"gradient_checkpointing": not args.no_checkpointing},
    }
    if family == "controlnet_sr":
        model["controlnet_sr"] = {"start": "lr_latent"}
    return build_config(
        {
            "model": model,
            "schedule": {
                "num_inference_steps": args.inference_steps,
                "mode": getattr(args, "mode", "trajectory"),
                "buffer": {"refresh_every": getattr(args, "refresh_every", 4)},
            },
            "losses": {
                "structure": {"window": [0, 19]},
                "reward": {"window": [40, 49], "terms": [{"name": "gmsd"}]},
                "gram": {"window": [40, 49], "allow_random_vgg": True},
                **losses,
            },
            "train": {"mixed_precision": args.precision, "batch_size": 1, "grad_accum": 1},
        }
    )


def measure(
    family: str, finetune: str, args: argparse.Namespace, **losses: object
) -> tuple[float, float]:
    """(samples/s, peak GPU memory in GiB or nan) over `args.steps` steps after 2 warm-ups;
    `losses`: extra `losses` keys (e.g. decode_crop). The index sequence depends only on the
    seed, so two calls with the same arguments see the same indices."""
    device = torch.device(args.device)
    cfg = make_config(family, finetune, args, **losses)
    torch.manual_seed(0)
    if args.pretrained:
        model = build_model(cfg.model, 4)
    else:
        model = (real_model if args.size == "real" else tiny_model)(family, cfg)
    model.to(device).train()
    state = build_state(cfg, model, device)
    hr = torch.rand(1, 3, args.hr, args.hr, device=device)
    batch = Batch(torch.nn.functional.interpolate(hr, scale_factor=0.25, mode="area"), hr)
    autocast = autocast_for(args.precision, device)
    for _ in range(2):
        optimizer_step(state, [batch], cfg, autocast)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(args.steps):
        optimizer_step(state, [batch], cfg, autocast)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return args.steps / seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["real", "tiny"], default="real")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hr", type=int, default=512, help="HR side; LR is a quarter")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--inference-steps", type=int, default=50)
    parser.add_argument("--precision", choices=["bf16", "fp16", "no"], default="bf16")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--pretrained", help="a real diffusers folder instead of random weights")
    args = parser.parse_args()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{args.size} architectures, {args.hr}² HR / {args.hr // 4}² LR, {args.precision},")
    print(f"{args.inference_steps} sampler steps, trajectory mode, on {device_name}\n")
    print("| family | trains | samples/s | peak GiB | LoRA speed-up | LoRA memory ratio |")
    print("|---|---|---|---|---|---|")
    for family, full in (("sd_upscaler", "unet"), ("controlnet_sr", "controlnet+unet_attention")):
        full_speed, full_peak = measure(family, full, args)
        lora_speed, lora_peak = measure(family, "lora", args)
        print(f"| {family} | {full} | {full_speed:.3f} | {full_peak:.2f} | | |")
        print(
            f"| {family} | lora r16 | {lora_speed:.3f} | {lora_peak:.2f} | "
            f"{lora_speed / full_speed:.2f}x | {lora_peak / full_peak:.2f} |"
        )


if __name__ == "__main__":
    main()
