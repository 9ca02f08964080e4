"""What a run prints: by default our own lines and actionable warnings; with `--verbose` (or
$RFSR_VERBOSE=1) also Ray's, Ray Data's, MLflow's and pyiqa's chatter and our per-rank INFO lines.

The driver calls `configure_driver`; every Ray worker process of the job runs `setup_worker` (Ray's
`worker_process_setup_hook`, set by `ray_runtime_env`), so a cluster joined under `ray job submit`
prints the same as a local one. Nothing is filtered by message text except three named warnings of
other libraries that nothing in this project can act on.
"""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_ENV = "RFSR_VERBOSE"

# Library loggers and the level they print at by default (INFO is their start-up chatter).
_QUIET_LEVELS = {
    "ray": logging.WARNING,
    "ray.data": logging.WARNING,
    "ray.train": logging.WARNING,
    "ray.tune": logging.WARNING,
    "mlflow": logging.WARNING,
    "alembic": logging.WARNING,
    "pyiqa": logging.WARNING,
    # Ray Data warns once per process that its progress bars are off: we turn them off on
    # purpose (the driver shows the training bar).
    "ray.data._internal.progress": logging.ERROR,
    # Ray says token authentication is on for every local cluster it starts.
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    # diffusers imports bitsandbytes, which says in every CPU process that its optional `kernels`
    # package is missing (it speeds up 4-bit CPU inference, which rfsr_ray never runs).
    "bitsandbytes.backends.cpu.ops": logging.ERROR,
}

# Libraries that set their logger's level from the environment when they load (after any level
# set here): quiet by default through these variables, in the driver and every worker.
_QUIET_ENV = {"RAY_DATA_LOG_LEVEL": "WARNING", "MLFLOW_LOGGING_LEVEL": "WARNING"}

# (message regex, category) of third-party warnings that no user of rfsr_ray can act on.
_IGNORED_WARNINGS = (
    # Ray Data's own actor passes a deprecated option to itself.
    (r"`ExecutionOptions.exclude_resources` is deprecated", DeprecationWarning),
)


def verbose() -> bool:
    """True when this process should print everything (`--verbose` sets it for the job)."""
    return os.environ.get(VERBOSE_ENV) == "1"


def _ray_train_report_logger() -> str:
    """Ray Train logs every `ray.train.report` (a full `TrainingReport(...)` repr, per rank) on a
    logger named by its file path, `logging.getLogger(__file__)`, so RunConfig's log level misses
    it. The path is built without importing Ray Train (this runs in every worker process)."""
    import ray

    return os.path.join(os.path.dirname(ray.__file__), "train/v2/_internal/execution/context.py")


def _apply(verbose_mode: bool, our_level: int) -> None:
    logging.getLogger("rfsr_ray").setLevel(our_level)
    if verbose_mode:
        return
    for name, level in {**_QUIET_LEVELS, _ray_train_report_logger(): logging.WARNING}.items():
        logging.getLogger(name).setLevel(level)
    for message, category in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def configure_driver(verbose_mode: bool) -> None:
    """Logging of the driver process; exported to the job's worker processes via the environment
    (`ray_runtime_env`)."""
    os.environ[VERBOSE_ENV] = "1" if verbose_mode else "0"
    if not verbose_mode:
        for name, value in _QUIET_ENV.items():
            os.environ.setdefault(name, value)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    _apply(verbose_mode, logging.INFO)


def setup_worker() -> None:
    """Ray's `worker_process_setup_hook`: runs first in every worker and actor process of the
    job. Our per-rank INFO lines (step metrics, validations) go to Ray's log files and MLflow;
    the driver's progress bar and validation lines replace them on the console."""
    verbose_mode = verbose()
    _apply(verbose_mode, logging.INFO if verbose_mode else logging.WARNING)
    pin_cluster_address()


def pin_cluster_address() -> None:
    """Point this worker's address lookups at its own cluster ($RAY_ADDRESS, unless set).

    Ray Train's placement-group cleaner (an actor of every fit) asks the State API whether the
    controller lives; the State API finds "the" cluster from $RAY_ADDRESS, else by scanning the
    machine's GCS processes. A local run's workers have no $RAY_ADDRESS, so with a second Ray
    instance on the machine (another run, a notebook, `ray start`) the lookup raises "Found
    multiple active Ray instances", the cleaner's thread dies and its traceback reaches the
    console."""
    import ray

    if not os.environ.get("RAY_ADDRESS") and ray.is_initialized():
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def ray_runtime_env(local_cluster: bool) -> dict:
    """The runtime environment the driver passes to `ray.init` (merged with a submitted job's own;
    Ray refuses only the same key set twice)."""
    env_vars = {VERBOSE_ENV: os.environ.get(VERBOSE_ENV, "0")}
    if not verbose():
        env_vars.update({name: os.environ.get(name, value) for name, value in _QUIET_ENV.items()})
    if local_cluster:
        # One machine is never preempted; Ray Train's preemption watcher actor makes Ray core log
        # an error line about its restart policy at every worker-group start.
        env_vars["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    return {"worker_process_setup_hook": "rfsr_ray.logs.setup_worker", "env_vars": env_vars}
