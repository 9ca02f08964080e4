"""Gradient steps per second of the RFSR step modes: one_step, trajectory, and trajectory_buffer
refreshed every R = 1, 4, 16 optimiser steps.

    .venv/bin/python benchmarks/step_modes.py                         # GPU: real architectures
    .venv/bin/python benchmarks/step_modes.py --size tiny --device cpu --hr 64

Latent families: benchmarks/latent_step.py's reference step (50 sampler steps, windows 0-19 and
40-49, batch 1, bf16 autocast, gradient checkpointing), full fine-tune. The `tiny` family: the
demo config (configs/demo.yaml) at its own size with random weights. Each mode starts from a
fresh state, takes one warm-up step (a buffer's first rollout), then 16 timed steps, which hold
exactly 16 / R rollouts for the buffer. Every mode draws the same indices (one seeded stream).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or imported
from latent_step import make_config, real_model, tiny_model

from rfsr_ray.config import load_config
from rfsr_ray.models import build_model
from rfsr_ray.train.step import Batch, autocast_for, build_state, optimizer_step

TIMED_STEPS = 16
MODES = [("one_step", 1), ("trajectory", 1), ("trajectory_buffer", 1), ("trajectory_buffer", 4),
         ("trajectory_buffer", 16)]  # fmt: skip
ROOT = Path(__file__).resolve().parent.parent


def steps_per_second(model, cfg, batch: Batch, device: torch.device, precision: str) -> float:
    state = build_state(cfg, model, device)
    autocast = autocast_for(precision, device)
    optimizer_step(state, [batch], cfg, autocast)  # warm-up; a buffer's first rollout
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(TIMED_STEPS):
        optimizer_step(state, [batch], cfg, autocast)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return TIMED_STEPS / (time.perf_counter() - started)


def with_mode(cfg, mode: str, refresh: int):
    schedule = cfg.schedule.model_copy(
        update={
            "mode": mode,
            "buffer": cfg.schedule.buffer.model_copy(update={"refresh_every": refresh}),
        }
    )
    return cfg.model_copy(update={"schedule": schedule})


def rows(name: str, build, cfg, batch, device, precision) -> list[str]:
    speeds = {}
    for mode, refresh in MODES:
        torch.manual_seed(0)
        model = build().to(device).train()
        speeds[(mode, refresh)] = steps_per_second(
            model, with_mode(cfg, mode, refresh), batch, device, precision
        )
    one_step, trajectory = speeds[("one_step", 1)], speeds[("trajectory", 1)]
    lines = []
    for (mode, refresh), speed in speeds.items():
        label = f"{mode} R={refresh}" if mode == "trajectory_buffer" else mode
        lines.append(
            f"| {name} | {label} | {speed:.3f} | {one_step / speed:.2f}× "
            f"| {speed / trajectory:.2f}× |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["real", "tiny"], default="real")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hr", type=int, default=512, help="latent families' HR side")
    parser.add_argument("--inference-steps", type=int, default=50)
    parser.add_argument("--precision", choices=["bf16", "fp16", "no"], default="bf16")
    args = parser.parse_args()
    args.pretrained, args.no_checkpointing = None, False
    device = torch.device(args.device)
    print(f"{args.size} latent architectures at {args.hr}² HR on {args.device}, {args.precision}; "
          f"tiny family at the demo's size; {TIMED_STEPS} timed steps per mode\n")  # fmt: skip
    print(
        "| model | mode | gradient steps/s | time per step vs one_step | speed-up vs trajectory |"
    )
    print("|---|---|---|---|---|")
    hr = torch.rand(1, 3, args.hr, args.hr, device=device)
    batch = Batch(torch.nn.functional.interpolate(hr, scale_factor=0.25, mode="area"), hr)
    for family, trains in (("sd_upscaler", "unet"), ("controlnet_sr", "controlnet+unet_attention")):
        cfg = make_config(family, trains, args)
        maker = real_model if args.size == "real" else tiny_model
        build = lambda f=family, c=cfg, m=maker: m(f, c)  # noqa: E731
        for line in rows(family, build, cfg, batch, device, args.precision):
            print(line, flush=True)
    demo = load_config(ROOT / "configs/demo.yaml", ["model.pretrained=null"])
    side = demo.data.patch_size
    hr = torch.rand(demo.train.batch_size, 3, side, side, device=device)
    batch = Batch(torch.nn.functional.interpolate(hr, scale_factor=0.25, mode="area"), hr)
    build = lambda: build_model(demo.model, demo.data.scale)  # noqa: E731
    for line in rows("tiny (demo)", build, demo, batch, device, "no"):
        print(line, flush=True)


if __name__ == "__main__":
    main()
