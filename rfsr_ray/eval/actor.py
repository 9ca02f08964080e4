"""The Ray Data actor of an evaluation: one model's `Upscaler` and the metrics' `Scorer` in one
process, so each row is super-resolved and scored where it already is.

One actor per model (`eval.actors_per_model`), not one to upscale and another to score: every
actor process imports torch, the model code and pyiqa (~10 s of CPU) and, on a GPU cluster,
holds a GPU; a second pool per model doubled both for no overlap worth having (scoring a
crop takes milliseconds next to sampling it)."""

from __future__ import annotations

from typing import Any

import numpy as np

from rfsr_ray.eval.inference import Upscaler
from rfsr_ray.eval.metrics import MetricInfo, Scorer


class UpscaleAndScore:
    """`Scorer(Upscaler(batch))`: `upscaler` holds `Upscaler`'s keyword arguments."""

    def __init__(self, upscaler: dict[str, Any], metrics: list[MetricInfo], crop: int) -> None:
        self.upscale = Upscaler(**upscaler)
        self.score = Scorer(metrics, crop)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return self.score(self.upscale(batch))
