"""Materialise a fixed LR/HR pair set to Parquet, with a preview grid and skip counts.

python pipelines/prepare_data.py --config configs/prepare_data.yaml [key.sub=value ...]
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence

from rfsr_ray.cli import init_ray, run_main
from rfsr_ray.config import RFSRConfig
from rfsr_ray.data.parquet import write_pair_set
from rfsr_ray.data.pipeline import build_pair_dataset, format_counts

log = logging.getLogger("rfsr_ray.prepare_data")


def prepare(cfg: RFSRConfig) -> int:
    init_ray()
    import ray.data

    # Deterministic row order, so the same config writes the same files on any cluster size.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    started = time.perf_counter()
    pipeline = build_pair_dataset(cfg.data, cfg.degradation)
    counts = write_pair_set(pipeline, cfg)
    seconds = time.perf_counter() - started
    print(format_counts(counts))
    print(
        f"wrote {counts.get('pairs', 0)} pairs in {seconds:.1f}s to {cfg.prepare.dir}/pairs "
        f"(preview: {cfg.prepare.dir}/preview.png, config: {cfg.prepare.dir}/config.yaml)"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(prepare, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
