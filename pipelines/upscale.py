"""Super-resolve a folder of images with an exported model or a training checkpoint.

    python pipelines/upscale.py infer.model=outputs/ray_results/demo_rfsr/model \\
        infer.input=photos/ infer.output=outputs/upscaled
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from rfsr_ray.cli import run_main
from rfsr_ray.config import RFSRConfig
from rfsr_ray.data.decode import decode_image
from rfsr_ray.data.sources import IMAGE_EXTENSIONS
from rfsr_ray.errors import ConfigError

log = logging.getLogger("rfsr_ray.upscale")


def upscale(cfg: RFSRConfig) -> int:
    infer = cfg.infer
    if infer.model is None or infer.input is None:
        raise ConfigError(
            "set infer.model (exported model or checkpoint folder) and infer.input "
            "(folder of images), e.g. infer.model=outputs/ray_results/demo_rfsr/model"
        )
    source = Path(infer.input)
    if not source.is_dir():
        raise ConfigError(f"infer.input={infer.input!r} is not a folder of images")
    # Imported once `run_main` has set up logging: the models' libraries log as they load.
    from rfsr_ray.eval.inference import load_any, tiled_super_resolve

    model = load_any(Path(infer.model))
    steps = infer.num_inference_steps or cfg.schedule.num_inference_steps
    files = sorted(p for p in source.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    counts: Counter[str] = Counter()
    for path in files:
        decoded = decode_image(path.read_bytes(), min_size=1, max_pixels=cfg.data.max_pixels)
        if decoded.image is None:
            counts[f"skipped_{decoded.skip}"] += 1
            print(f"skipped {path}: {decoded.skip}")
            continue
        target = Path(infer.output) / path.relative_to(source).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        # Inputs larger than eval.tile_size (LR px) are tiled, as in pipelines/evaluate.py.
        tile, overlap = cfg.eval.tile_size, cfg.eval.tile_overlap
        sr = tiled_super_resolve(model, decoded.image, steps, infer.seed, tile, overlap)
        Image.fromarray(sr).save(target)
        counts["written"] += 1
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if k != "written")
    print(f"wrote {counts['written']} images to {infer.output}; skipped: {skipped or 'none'}")
    return 0 if counts["written"] or not files else 1


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(upscale, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
