"""Write the tiny random ldm_sr base model (a diffusers LDMSuperResolutionPipeline folder).

python examples/ldm_sr/make_tiny.py --out outputs/base/ldm_sr_tiny
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

# Run as a script from anywhere: the package sits beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rfsr_ray.logs import configure_driver

configure_driver(verbose_mode=False)  # before diffusers loads: rfsr_ray's quiet library loggers

from ldm_sr_family import save_tiny_ldm_sr  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write the pipeline to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    folder = save_tiny_ldm_sr(args.out, args.seed)
    print(f"tiny ldm_sr pipeline written to {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
