"""Shared command-line handling of the entry scripts in `pipelines/`.

Every pipeline is `python pipelines/NAME.py --config FILE.yaml [key.sub=value ...]`, plus
`--print-config` to show the resolved config and exit, and `--verbose` to print Ray's, MLflow's
and every rank's log lines too (`rfsr_ray.logs`). The training pipelines also take `--resume`:
continue `output.run_name` even though training-relevant keys changed.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence

from rfsr_ray import logs
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
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also print Ray's, Ray Data's, MLflow's and pyiqa's log lines and every rank's "
        "step metrics (default: a progress bar, one line per validation, warnings)",
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
    return config_from_args(parser.parse_args(argv))


def config_from_args(args: argparse.Namespace) -> RFSRConfig | None:
    """The validated config of parsed arguments; prints it and returns None for --print-config."""
    overrides = list(args.overrides)
    if getattr(args, "resume", False):
        overrides.append("output.allow_config_change=true")
    cfg = with_absolute_paths(load_config(args.config, overrides))
    if cfg.model.family == "plugin" or cfg.model.py_modules:
        # Imported only then: rfsr_ray.models loads torch and diffusers (seconds).
        from rfsr_ray.models.plugin import check_plugin

        check_plugin(cfg.model)  # a plug-in builder must import here, before Ray starts
    if args.print_config:
        sys.stdout.write(cfg.to_yaml())
        return None
    return cfg


def local_cpus(cfg: RFSRConfig, concurrent_runs: int = 1) -> int:
    """Logical CPUs for a local cluster: the training workers' reservation plus room for the data
    stage, per concurrent run (sweep trials). Without that room, workers holding every CPU
    starve Ray Data and the job hangs."""
    cores = os.cpu_count() or 1
    training = cfg.train.num_workers * cfg.train.cpus_per_worker + cfg.tune.trial_cpus
    return max(cores, math.ceil(concurrent_runs * (training + 2 * cfg.data.num_cpus)))


def init_ray(num_cpus: int | None = None, py_modules: Sequence[str] = ()) -> None:
    """Join the cluster at $RAY_ADDRESS (as under `ray job submit`), else start a local one.
    `py_modules` (`model.py_modules`) are shipped to every worker of the job."""
    import ray

    if ray.is_initialized():
        return
    shipped = {"py_modules": list(py_modules)} if py_modules else {}
    if os.environ.get("RAY_ADDRESS"):  # every worker process logs as the driver does
        runtime_env = {**logs.ray_runtime_env(local_cluster=False), **shipped}
        ray.init(log_to_driver=True, runtime_env=runtime_env)
    else:
        runtime_env = {**logs.ray_runtime_env(local_cluster=True), **shipped}
        # With the dashboard: Ray Train's placement-group cleaner polls the State API, which the
        # dashboard serves; without it the cleaner warns every few seconds.
        info = ray.init(
            # "local": never the cluster a `ray start --head` recorded in /tmp/ray (ray.init's
            # default joins it, then refuses num_cpus); $RAY_ADDRESS is how a job joins one.
            address="local",
            num_cpus=num_cpus,
            include_dashboard=True,
            log_to_driver=True,
            runtime_env=runtime_env,
            logging_level=logging.INFO if logs.verbose() else logging.WARNING,
            # A run starts about ten Python workers (trainers, Train's controller, Ray Data's
            # coordinators and tasks); Ray's default allows one start per core at a time and
            # warns past 4x that, which a 2-core machine reaches on every run.
            _system_config={"worker_maximum_startup_concurrency": max(4, os.cpu_count() or 1)},
        )
        log.info("Ray: local cluster of %s CPUs, dashboard http://%s", num_cpus, info.dashboard_url)
    import ray.data

    # Ray Data's bars on a terminal; training runs turn them off for their own bar (run_training).
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()


def run_main(
    body: Callable[[RFSRConfig], int],
    argv: Sequence[str] | None,
    description: str,
    resumable: bool = False,
) -> int:
    """Parse, then run `body(cfg) -> int`; user errors print one clear line and return 2.
    `resumable`: the pipeline trains a run name and takes `--resume`."""
    parser = build_parser(description, resumable)
    args = parser.parse_args(argv)
    logs.configure_driver(args.verbose)
    try:
        cfg = config_from_args(args)
        if cfg is None:
            return 0
        return body(cfg)
    except RFSRError as error:
        sys.stderr.write(f"error: {type(error).__name__}: {error}\n")
        return 2
