"""The demo's base model against bicubic upsampling of the same LR, on the demo's held-out set.

    .venv/bin/python benchmarks/base_vs_bicubic.py [--model outputs/base/tiny_x4]
        [--config configs/demo.yaml] [--grid base_vs_bicubic.png] [key.sub=value ...]

The held-out pairs are the demo's validation set itself (`build_validation_set` on the demo
config: `data.val_source` crops of `data.val_patch_size`, never trained on), sampled as validation
samples them (`rfsr_ray.train.validate.sample_set`: its batches, their `validation` seed
streams, `schedule.num_inference_steps`). Targets (issue 15): the
base beats bicubic on SSIM (higher) and GMSD (lower), and each colour channel's mean is within 2 %
of the HR's; PSNR is reported. Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from rfsr_ray import logs
from rfsr_ray.config import RFSRConfig, load_config
from rfsr_ray.images import bicubic_upscale, image_grid, to_uint8
from rfsr_ray.iqa import create_metric
from rfsr_ray.models import load_model
from rfsr_ray.train.context import ValidationSet
from rfsr_ray.train.driver import build_validation_set
from rfsr_ray.train.validate import sample_set

COLOUR_TOLERANCE = 2.0  # % of the HR channel mean


def held_out_set(cfg: RFSRConfig) -> ValidationSet:
    """The demo's validation pairs, made by the training driver's own function."""
    import ray
    import ray.data

    logs.configure_driver(verbose_mode=False)  # Ray's chatter off, as in the pipelines
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        val_set = build_validation_set(cfg)
    finally:
        ray.shutdown()
    if val_set is None:
        raise SystemExit("the config has no data.val_source / data.val_pairs to measure on")
    return val_set


@torch.no_grad()
def sample_base(model_path: str, cfg: RFSRConfig, lr_image: torch.Tensor) -> torch.Tensor:
    """The base's SR of the set, with validation's own sampling (its batches and noise)."""
    model = load_model(model_path)
    steps = cfg.schedule.num_inference_steps
    return sample_set(model, lr_image, steps, cfg.train.seed, reference=False)


@torch.no_grad()
def measure(sr_image: torch.Tensor, hr_image: torch.Tensor) -> dict[str, float]:
    """PSNR, SSIM, GMSD (means over the set) and each channel's mean relative to HR's, in %."""
    values = {
        name: float(create_metric(name)(sr_image, hr_image).mean())
        for name in ("psnr", "ssim", "gmsd")
    }
    for channel, name in enumerate("RGB"):
        ratio = sr_image[:, channel].mean() / hr_image[:, channel].mean()
        values[f"{name} mean"] = float(100 * (ratio - 1))
    return values


def table(bicubic: dict[str, float], base: dict[str, float]) -> tuple[str, bool]:
    """Markdown table bicubic | base | Δ | target, and whether every target is met."""
    lines = ["| metric | bicubic | base | Δ | target |", "|---|---:|---:|---:|---|"]
    passed = True
    for name in bicubic:
        delta = base[name] - bicubic[name]
        if name in ("ssim", "gmsd"):
            ok = delta > 0 if name == "ssim" else delta < 0
            target = ("> bicubic" if name == "ssim" else "< bicubic") + (" ✓" if ok else " ✗")
        elif name.endswith("mean"):
            ok = abs(base[name]) <= COLOUR_TOLERANCE
            target = f"within ±{COLOUR_TOLERANCE:g} % of HR" + (" ✓" if ok else " ✗")
        else:
            ok, target = True, "reported"
        passed &= ok
        unit = " %" if name.endswith("mean") else ""
        arrow = {"psnr": " ↑", "ssim": " ↑", "gmsd": " ↓"}.get(name, " vs HR")
        lines.append(
            f"| {name}{arrow}{unit} | {bicubic[name]:.4f} | {base[name]:.4f} | {delta:+.4f} "
            f"| {target} |"
        )
    return "\n".join(lines), passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="outputs/base/tiny_x4", help="exported model folder")
    parser.add_argument("--config", default="configs/demo.yaml", help="whose held-out set")
    parser.add_argument("--grid", type=Path, help="write rows of bicubic | base | HR here")
    parser.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # like one validating Ray worker
    cfg = load_config(args.config, args.overrides)

    started = time.perf_counter()
    val_set = held_out_set(cfg)
    lr_image, hr_image = val_set.tensors(torch.device("cpu"))
    made = time.perf_counter() - started
    started = time.perf_counter()
    sr_image = sample_base(args.model, cfg, lr_image)
    sampled = time.perf_counter() - started
    bicubic = bicubic_upscale(lr_image, hr_image.shape[-2:])

    report, passed = table(measure(bicubic, hr_image), measure(sr_image, hr_image))
    source = cfg.data.val_source
    if cfg.data.val_pairs or source is None:
        source = cfg.data.val_pairs
    elif source.kind == "builtin":
        source = "builtin:" + "+".join(source.names or ["all"])
    else:
        source = source.path
    print(
        f"{args.model} on {len(hr_image)} held-out {hr_image.shape[-1]}² HR crops of "
        f"{source} ({cfg.degradation.preset} degradation, "
        f"{cfg.schedule.num_inference_steps} sampler steps)\n\n{report}\n\n"
        f"{'PASS' if passed else 'FAIL'}: base vs bicubic on SSIM and GMSD, colour within "
        f"{COLOUR_TOLERANCE:g} %\npairs {made:.1f} s, sampling {sampled:.1f} s (1 thread), "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    if args.grid:
        columns = [to_uint8(images) for images in (bicubic, sr_image, hr_image)]
        Image.fromarray(image_grid([list(row) for row in zip(*columns, strict=True)])).save(
            args.grid
        )
        print(f"grid (bicubic | base | HR): {args.grid}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
