"""Shared command-line handling of the entry scripts in `pipelines/`.

Every pipeline is `python pipelines/NAME.py --config FILE.yaml [key.sub=value ...]`, plus
`--print-config` to show the resolved config and exit. The training pipelines also take
`--resume`: continue `output.run_name` even though training-relevant keys changed.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence

from rfsr_ray.config import RFSRConfig, load_config, with_absolute_paths
from rfsr_ray.errors import RFSRError

log = logging.getLogger("rfsr_ray")


def build_parser(description: str, resumable: bool = False) -> argparse.ArgumentParser:
    """The shared parser; `resumable` adds `--resume` (pipelines that train a run name)."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Overrides: key.sub=value, e.g. train.steps=100 data.sources=[builtin,/data/hr] "
        "degradation.jpeg_range=[30,95]. Values are parsed as YAML.",
    )
    parser.add_argument("--config", help="YAML config file (defaults apply to omitted keys)")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    if resumable:
        parser.add_argument(
            "--resume",
            action="store_true",
            help="continue output.run_name from its checkpoint even though training-relevant "
            "keys changed (output.allow_config_change=true); the changes are logged",
        )
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return parser


def parse_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> RFSRConfig | None:
    """Parse argv into a validated config; prints it and returns None for --print-config."""
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if getattr(args, "resume", False):
        overrides.append("output.allow_config_change=true")
    cfg = with_absolute_paths(load_config(args.config, overrides))
    if args.print_config:
        sys.stdout.write(cfg.to_yaml())
        return None
    return cfg


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )


def local_cpus(cfg: RFSRConfig, concurrent_runs: int = 1) -> int:
    """Logical CPUs for a local cluster: the training workers' reservation plus room for the data
    stage, per concurrent run (sweep trials). Without that room, workers holding every CPU
    starve Ray Data and the job hangs."""
    cores = os.cpu_count() or 1
    training = cfg.train.num_workers * cfg.train.cpus_per_worker + cfg.tune.trial_cpus
    return max(cores, math.ceil(concurrent_runs * (training + 2 * cfg.data.num_cpus)))


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster at $RAY_ADDRESS (as under `ray job submit`), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()


def run_main(
    body: Callable[[RFSRConfig], int],
    argv: Sequence[str] | None,
    description: str,
    resumable: bool = False,
) -> int:
    """Parse, then run `body(cfg) -> int`; user errors print one clear line and return 2.
    `resumable`: the pipeline trains a run name and takes `--resume`."""
    setup_logging()
    parser = build_parser(description, resumable)
    try:
        cfg = parse_config(parser, argv)
        if cfg is None:
            return 0
        return body(cfg)
    except RFSRError as error:
        sys.stderr.write(f"error: {type(error).__name__}: {error}\n")
        return 2
