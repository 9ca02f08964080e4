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

import numpy as np
import torch
from PIL import Image

from rfsr_ray.cli import run_main
from rfsr_ray.config import RFSRConfig
from rfsr_ray.data.decode import decode_image
from rfsr_ray.data.sources import IMAGE_EXTENSIONS
from rfsr_ray.errors import ConfigError
from rfsr_ray.images import to_tensor, to_uint8
from rfsr_ray.models import ISRDiffusionModel, load_model
from rfsr_ray.train.checkpoint import COMPLETE_MARKER, model_from_checkpoint

log = logging.getLogger("rfsr_ray.upscale")
PAD_MULTIPLE = 16  # UNet down-sampling needs sides divisible by 2^depth


def load_any(path: Path) -> ISRDiffusionModel:
    if (path / COMPLETE_MARKER).is_file():
        return model_from_checkpoint(path)
    return load_model(path)


def super_resolve(model: ISRDiffusionModel, image: np.ndarray, steps: int, seed: int) -> np.ndarray:
    """uint8 (h, w, 3) → uint8 (h·s, w·s, 3); reflect-pads to the UNet's multiple, then crops."""
    height, width = image.shape[:2]
    pad_h, pad_w = -height % PAD_MULTIPLE, -width % PAD_MULTIPLE
    mode = "reflect" if pad_h < height and pad_w < width else "edge"
    padded = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode=mode)
    generator = torch.Generator().manual_seed(seed)
    sr = model.sample(to_tensor(padded[None]), steps, generator)
    return to_uint8(sr)[0, : height * model.scale, : width * model.scale]


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
        Image.fromarray(super_resolve(model, decoded.image, steps, infer.seed)).save(target)
        counts["written"] += 1
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if k != "written")
    print(f"wrote {counts['written']} images to {infer.output}; skipped: {skipped or 'none'}")
    return 0 if counts["written"] or not files else 1


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(upscale, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
