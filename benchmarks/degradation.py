"""Degradation throughput: plain single-core loop vs Ray Data, with a per-op cost breakdown.

    .venv/bin/python benchmarks/degradation.py [--pairs 400] [--patch-size 256] [--cpus 2]

256² HR patches at ×4 with the `realesrgan_x4plus` preset. Targets: >= 60 pairs/s per core in the
plain loop; Ray Data per-core throughput >= 0.8x the plain loop.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from rfsr_ray.config import SourceConfig, build_config
from rfsr_ray.data import degradations
from rfsr_ray.data.pairs import pairs_from_image
from rfsr_ray.data.sources import BUILTIN_IMAGES, builtin_image


def plain_loop(cfg, count: int) -> float:
    images = [builtin_image(name) for name in BUILTIN_IMAGES]
    per_image = max(1, count // len(images))
    data = cfg.data.model_copy(update={"crops_per_image": per_image})
    started = time.perf_counter()
    made = sum(
        len(pairs_from_image(image, name, per_image, 0, data, cfg.degradation))
        for name, image in zip(BUILTIN_IMAGES, images, strict=True)
    )
    return made / (time.perf_counter() - started)


def op_breakdown(cfg, count: int) -> dict[str, float]:
    """Seconds per pair spent in each op, by wrapping the module's op functions."""
    totals: dict[str, float] = defaultdict(float)
    originals = {}
    for name in (
        "blur",
        "resize",
        "add_gaussian_noise",
        "add_poisson_noise",
        "jpeg",
        "_draw_kernel",
    ):
        original = getattr(degradations, name)
        originals[name] = original

        @functools.wraps(original)
        def timed(*args, _original=original, _name=name, **kwargs):
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                totals[_name] += time.perf_counter() - started

        setattr(degradations, name, timed)
    try:
        image = builtin_image("astronaut")
        started = time.perf_counter()
        pairs_from_image(image, "astronaut", count, 0, cfg.data, cfg.degradation)
        totals["total"] = time.perf_counter() - started
    finally:
        for name, original in originals.items():
            setattr(degradations, name, original)
    totals["other (crop, sampling, conversion)"] = totals["total"] - sum(
        v for k, v in totals.items() if k != "total"
    )
    return {name: seconds / count for name, seconds in totals.items()}


def write_folder(folder: Path, files: int, size: int) -> None:
    """`files` PNG crops of the built-in images: a folder source like a real HR set."""
    rng = np.random.default_rng(0)
    images = [builtin_image(name) for name in BUILTIN_IMAGES]
    for index in range(files):
        image = images[index % len(images)]
        top = rng.integers(0, image.shape[0] - size + 1)
        left = rng.integers(0, image.shape[1] - size + 1)
        Image.fromarray(image[top : top + size, left : left + size]).save(folder / f"{index}.png")


def ray_data(cfg, count: int, cpus: int) -> float:
    import ray

    from rfsr_ray.data.pipeline import build_pair_dataset

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    files = 48
    folder = Path(tempfile.mkdtemp())
    write_folder(folder, files, 300)
    data = cfg.data.model_copy(
        update={
            "crops_per_image": max(1, count // files),
            "sources": (SourceConfig(kind="folder", path=str(folder)),),
        }
    )
    build_pair_dataset(data, cfg.degradation).dataset.take(1)  # warm up workers and imports
    pipeline = build_pair_dataset(data, cfg.degradation)
    started = time.perf_counter()
    made = sum(len(batch["lr"]) for batch in pipeline.dataset.iter_batches(batch_size=64))
    seconds = time.perf_counter() - started
    ray.shutdown()
    shutil.rmtree(folder)
    return made / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    cfg = build_config(
        {
            "data": {"patch_size": args.patch_size, "scale": 4, "batch_size": 4},
            "degradation": {"preset": "realesrgan_x4plus"},
        }
    )
    cv2.setNumThreads(1)
    np.random.default_rng(0)
    loop = plain_loop(cfg, args.pairs)
    print(f"plain loop, 1 core:        {loop:7.1f} pairs/s   (target >= 60)")
    breakdown = op_breakdown(cfg, 100)
    for name, seconds in sorted(breakdown.items(), key=lambda kv: -kv[1]):
        print(f"  {name:36s} {seconds * 1e3:6.2f} ms/pair")
    ray_rate = ray_data(cfg, args.pairs, args.cpus)
    per_core = ray_rate / args.cpus
    print(
        f"Ray Data, {args.cpus} CPUs:           {ray_rate:7.1f} pairs/s = {per_core:.1f} per core"
    )
    print(f"ratio Ray Data per core / plain loop: {per_core / loop:.2f}   (target >= 0.8)")


if __name__ == "__main__":
    main()
