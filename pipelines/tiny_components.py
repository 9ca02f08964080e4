"""Write tiny random Stable Diffusion components for a latent family (tests and smoke runs).

python pipelines/tiny_components.py --family sd_upscaler --out outputs/tiny_components/sd_upscaler

The folder is a diffusers pipeline folder, loaded exactly as real weights are; its outputs are
noise. Use it to check a cluster, a config or the code path before spending GPU hours.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rfsr_ray.logs import configure_driver


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    families = ["sd_upscaler", "controlnet_sr", "seesr"]
    parser.add_argument("--family", required=True, choices=families)
    parser.add_argument("--out", required=True, help="folder to write (must not exist)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if Path(args.out).exists():
        print(f"error: {args.out} exists; pick a new folder or delete it", file=sys.stderr)
        return 2
    configure_driver(verbose_mode=False)  # before diffusers loads: quiet library loggers
    from rfsr_ray.testing.tiny_components import save_tiny_components

    folder = save_tiny_components(args.family, args.out, args.seed)
    print(f"tiny {args.family} components written to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
