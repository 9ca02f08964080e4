"""MLflow: the only module that talks to MLflow.

Runs are addressed by id through `MlflowClient`, never through MLflow's global "active run", so
the same code logs from the driver and from the rank-0 Ray worker.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from rfsr_ray.config import RFSRConfig
from rfsr_ray.errors import TrackingError

PACKAGES = ("rfsr_ray", "torch", "torchvision", "ray", "diffusers", "pyiqa", "mlflow", "numpy")


def resolve_tracking_uri(cfg: RFSRConfig) -> str:
    """`tracking.uri`, else $MLFLOW_TRACKING_URI, else SQLite `mlflow.db` in the working dir."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path('mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # Ray workers run in another directory: make relative SQLite paths absolute.
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}"


@dataclass(frozen=True)
class RunHandle:
    """Everything a worker needs to log into an existing run (picklable)."""

    tracking_uri: str
    run_id: str
    experiment_id: str


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_reachable(uri: str) -> None:
    """Fail fast, before any training, when a remote tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        _client(uri).search_experiments(max_results=1)
    except Exception as error:  # MLflow raises requests/MlflowException variants
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({type(error).__name__}); start it, fix "
            "tracking.uri / $MLFLOW_TRACKING_URI, or set tracking.enabled=false"
        ) from None


def _experiment_id(client: Any, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        # Keep artifacts beside the SQLite store, as an absolute path every worker can reach.
        db = Path(uri.removeprefix("sqlite:///"))
        artifact_location = (db.parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def start_run(
    cfg: RFSRConfig,
    run_name: str,
    existing_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> RunHandle:
    """Create a run (params: flattened config, versions, git commit) or reopen `existing_run_id`."""
    uri = resolve_tracking_uri(cfg)
    check_reachable(uri)
    client = _client(uri)
    experiment_id = _experiment_id(client, cfg.tracking.experiment, uri)
    if existing_run_id:
        client.update_run(existing_run_id, status="RUNNING")
        return RunHandle(uri, existing_run_id, experiment_id)
    run = client.create_run(experiment_id, run_name=run_name, tags=tags or {})
    handle = RunHandle(uri, run.info.run_id, experiment_id)
    params = {**flatten(cfg.to_dict()), **package_versions(), "git_commit": git_commit()}
    log_params(handle, params)
    return handle


def log_params(handle: RunHandle, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    client = _client(handle.tracking_uri)
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(handle.run_id, params=items[start : start + 100])


def log_metrics(handle: RunHandle, metrics: dict[str, float], step: int) -> None:
    import time

    from mlflow.entities import Metric

    timestamp = int(time.time() * 1000)
    items = [Metric(k, float(v), timestamp, step) for k, v in metrics.items()]
    client = _client(handle.tracking_uri)
    for start in range(0, len(items), 500):
        client.log_batch(handle.run_id, metrics=items[start : start + 500])


def last_logged_step(handle: RunHandle) -> int:
    """The highest step at which the run holds any metric; -1 for none."""
    client = _client(handle.tracking_uri)
    names = client.get_run(handle.run_id).data.metrics.keys()
    return max(
        (point.step for name in names for point in client.get_metric_history(handle.run_id, name)),
        default=-1,
    )


def log_artifact(handle: RunHandle, path: str | Path, artifact_path: str | None = None) -> None:
    """Log a file, or a folder's contents, under `artifact_path`."""
    client = _client(handle.tracking_uri)
    path = Path(path)
    if path.is_dir():
        client.log_artifacts(handle.run_id, str(path), artifact_path)
    else:
        client.log_artifact(handle.run_id, str(path), artifact_path)


def set_tags(handle: RunHandle, tags: dict[str, str]) -> None:
    client = _client(handle.tracking_uri)
    for key, value in tags.items():
        client.set_tag(handle.run_id, key, value)


def add_numbered_tag(handle: RunHandle, prefix: str, value: str) -> str:
    """Set `prefix.N` to `value`, N one more than the run's existing `prefix.*` tags (a
    history of events in the run's tags, e.g. every resume); returns the key."""
    client = _client(handle.tracking_uri)
    existing = [key for key in client.get_run(handle.run_id).data.tags if key.startswith(prefix)]
    key = f"{prefix}.{len(existing) + 1}"
    client.set_tag(handle.run_id, key, value)
    return key


def end_run(handle: RunHandle, status: str = "FINISHED") -> None:
    _client(handle.tracking_uri).set_terminated(handle.run_id, status=status)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}; lists become their string form."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def package_versions() -> dict[str, str]:
    versions = {"version.python": sys.version.split()[0]}
    for package in PACKAGES:
        try:
            versions[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[f"version.{package}"] = "not installed"
    return versions


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def child_runs(parent: RunHandle) -> list[Any]:
    """Runs nested under `parent` (tag `mlflow.parentRunId`), oldest first."""
    return _client(parent.tracking_uri).search_runs(
        [parent.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}'",
        order_by=["attributes.start_time ASC"],
    )


def find_child_run(parent: RunHandle, tag: str, value: str) -> str | None:
    """The id of the child run of `parent` whose `tag` equals `value`, if any."""
    for run in child_runs(parent):
        if run.data.tags.get(tag) == value:
            return run.info.run_id
    return None


def reopen_run(tracking_uri: str, run_id: str) -> RunHandle:
    run = _client(tracking_uri).get_run(run_id)
    return RunHandle(tracking_uri, run_id, run.info.experiment_id)


def tag_if_present(tracking_uri: str, run_id: str, tags: dict[str, str]) -> bool:
    """Tag a run that may live in another store; False (no error) when it is not found here."""
    from mlflow.exceptions import MlflowException

    try:
        client = _client(tracking_uri)
        client.get_run(run_id)
    except MlflowException:
        return False
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    return True
