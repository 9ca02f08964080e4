"""The streaming Ray Data pipeline: HR sources → decoded images → LR/HR pairs.

`build_pair_dataset` returns a `PairPipeline`: a lazy `ray.data.Dataset` (schema in
`rfsr_ray.data.pairs`) and, unless built with `count=False`, a `PipelineStats` actor that counts
every decode outcome while the dataset streams; read the counts with `PairPipeline.counts()` once
the dataset has been consumed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import ray
import ray.data
from ray.data import TaskPoolStrategy

from rfsr_ray.config import DataConfig, DegradationConfig, SourceConfig
from rfsr_ray.data.decode import SKIP_REASONS
from rfsr_ray.data.pairs import make_pair_batch
from rfsr_ray.data.sources import read_sources
from rfsr_ray.errors import DataError


@ray.remote(num_cpus=0)
class PipelineStats:
    """Counts decode outcomes across all degradation tasks of one pipeline."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, counts: dict[str, int]) -> None:
        self.counts.update(counts)

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


@dataclass(frozen=True)
class PairPipeline:
    dataset: ray.data.Dataset
    stats: Any  # ActorHandle[PipelineStats], None for a pipeline built with count=False

    def counts(self) -> dict[str, int]:
        """Outcome counts so far: `decoded`, `pairs`, `skipped_*`, `converted_*`, and `tagged`
        when a seesr run's tagger stage (rfsr_ray.train.tagging) counts into it."""
        if self.stats is None:
            raise ValueError("this pipeline was built with count=False: it keeps no counts")
        return ray.get(self.stats.snapshot.remote())


def _pair_batch(
    batch: dict[str, np.ndarray], data: DataConfig, degradation: DegradationConfig, stats: Any
) -> dict[str, np.ndarray]:
    # One OpenCV thread per task: Ray already runs one task per reserved CPU.
    cv2.setNumThreads(1)
    pairs, counts = make_pair_batch(batch, data, degradation)
    if stats is not None:  # blocking, so counts are complete when the stream is
        ray.get(stats.add.remote(dict(counts)))
    return pairs


def _with_epoch(dataset: ray.data.Dataset, epoch: int) -> ray.data.Dataset:
    def add_epoch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch["epoch"] = np.full(len(batch["source_id"]), epoch, dtype=np.int64)
        return batch

    return dataset.map_batches(add_epoch, batch_format="numpy")


def build_pair_dataset(
    data: DataConfig,
    degradation: DegradationConfig,
    epochs: Sequence[int] = (0,),
    sources: tuple[SourceConfig, ...] | None = None,
    count: bool = True,
) -> PairPipeline:
    """Lazy Dataset of pairs for the given epochs (each epoch draws fresh degradations).

    `sources` defaults to `data.sources`; pass `(data.val_source,)` for a held-out set.
    `count`: keep outcome counts in a `PipelineStats` actor (one more Ray process; a caller
    that never reads them passes False).
    """
    source_rows = read_sources(sources or data.sources)
    per_epoch = [_with_epoch(source_rows, epoch) for epoch in epochs]
    rows = per_epoch[0] if len(per_epoch) == 1 else per_epoch[0].union(*per_epoch[1:])
    stats = PipelineStats.remote() if count else None
    dataset = rows.map_batches(
        _pair_batch,
        batch_size=data.batch_size,
        batch_format="numpy",
        compute=TaskPoolStrategy(size=data.concurrency),
        num_cpus=data.num_cpus,
        fn_kwargs={"data": data, "degradation": degradation, "stats": stats},
    )
    return PairPipeline(dataset, stats)


def format_counts(counts: dict[str, int]) -> str:
    """Human-readable outcome report, skip reasons first."""
    skipped = {k.removeprefix("skipped_"): v for k, v in counts.items() if k.startswith("skipped_")}
    converted = {
        k.removeprefix("converted_"): v for k, v in counts.items() if k.startswith("converted_")
    }
    lines = [
        f"images decoded: {counts.get('decoded', 0)}, pairs made: {counts.get('pairs', 0)}",
        "skipped: " + (", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "none"),
        "converted: " + (", ".join(f"{k}={v}" for k, v in sorted(converted.items())) or "none"),
    ]
    if "tagged" in counts:  # a seesr run's DAPE stage
        lines.append(f"pairs tagged by DAPE: {counts['tagged']}")
    return "\n".join(lines)


def raise_if_empty(counts: dict[str, int], where: str) -> None:
    """Fail with the skip reasons when a pipeline produced no pair at all."""
    if counts.get("pairs", 0) > 0:
        return
    reasons = {r: counts.get(f"skipped_{r}", 0) for r in SKIP_REASONS}
    listed = ", ".join(f"{r}={n}" for r, n in reasons.items() if n) or "no input images found"
    raise DataError(
        f"{where}: every input was skipped, no pair was made ({listed}). Check the sources, "
        "lower data.patch_size, set data.pad_small=true, or raise data.max_pixels"
    )
