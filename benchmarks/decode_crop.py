"""What `losses.decode_crop` buys per RFSR step: steps/s with the whole image decoded with gradient
against a crop of half its side (the ratio of 256 in 512²), per latent family and step mode.

    .venv/bin/python benchmarks/decode_crop.py                       # GPU: real architectures
    .venv/bin/python benchmarks/decode_crop.py --size tiny --device cpu --hr 128 --crop 64

The step is benchmarks/latent_step.py's reference step (50 sampler steps, windows 0-19 and 40-49,
bf16 autocast, batch 1, gradient checkpointing); both runs of a pair draw the same indices. One-step
mode stands for a fully amortised rollout (the trajectory buffer's ceiling). The FLOP model of the
same comparison at 512² is `benchmarks/flops.py --decode-crop 256`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

# Run as a script (`python benchmarks/…`) or imported as `benchmarks.…` (tests): either way
# its sibling module is importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from latent_step import measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["real", "tiny"], default="real")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hr", type=int, default=512, help="HR side; LR is a quarter")
    parser.add_argument("--crop", type=int, default=256, help="losses.decode_crop (HR px)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--inference-steps", type=int, default=50)
    parser.add_argument("--precision", choices=["bf16", "fp16", "no"], default="bf16")
    parser.add_argument("--modes", nargs="+", default=["one_step", "trajectory"])
    args = parser.parse_args()
    args.pretrained, args.no_checkpointing = None, False
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"{args.size} architectures on {args.device}, {args.hr}² HR, decode_crop {args.crop}")
    print(f"({args.steps} steps each after 2 warm-ups, {args.precision})\n")
    print("| family | mode | steps/s whole | steps/s crop | speed-up |")
    print("|---|---|---|---|---|")
    for family, trains in (("sd_upscaler", "unet"), ("controlnet_sr", "controlnet+unet_attention")):
        for mode in args.modes:
            args.mode = mode
            whole, _ = measure(family, trains, args)
            cropped, _ = measure(family, trains, args, decode_crop=args.crop)
            print(f"| {family} | {mode} | {whole:.3f} | {cropped:.3f} | {cropped / whole:.2f}× |")


if __name__ == "__main__":
    main()
