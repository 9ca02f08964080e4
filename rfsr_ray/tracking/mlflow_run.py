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
from typing import TYPE_CHECKING, Any

from rfsr_ray.config import RFSRConfig
from rfsr_ray.errors import TrackingError

if TYPE_CHECKING:
    import numpy as np

# MLflow 3's experiment kind: runs and charts in the UI, not the GenAI (traces) view.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_MODEL_TRAINING_VIEW = "workflowType=machine_learning"  # the UI's query for that view
DESCRIPTION_TAG = "mlflow.note.content"  # the run description the UI shows and edits
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


def run_page_url(base_url: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI at `base_url` (e.g. http://127.0.0.1:5000), in its Model
    training view: MLflow 3.17's UI opens in the GenAI view unless the link asks otherwise (it
    keeps a per-browser choice and does not read the experiment kind)."""
    return f"{base_url}/#/experiments/{experiment_id}/runs/{run_id}?{UI_MODEL_TRAINING_VIEW}"


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
    """The id of experiment `name`, created if missing; either way marked as a model-training
    experiment (MLflow 3 otherwise may open it in its GenAI view)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # a kind someone chose stays
            client.set_experiment_tag(
                experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
            )
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        # Keep artifacts beside the SQLite store, as an absolute path every worker can reach.
        db = Path(uri.removeprefix("sqlite:///"))
        artifact_location = (db.parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(
        name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    )


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


def log_metrics(
    handle: RunHandle, metrics: dict[str, float], step: int, model_id: str | None = None
) -> None:
    """Log `metrics` at `step`; with `model_id` they are also the metrics of that logged model
    (MLflow 3), shown on its page and in the run's model list."""
    import time

    from mlflow.entities import Metric

    timestamp = int(time.time() * 1000)
    items = [Metric(k, float(v), timestamp, step, model_id=model_id) for k, v in metrics.items()]
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


def log_image(handle: RunHandle, image: np.ndarray, key: str, step: int) -> None:
    """A stepped image (uint8 (H, W, 3)) under `key`: the run's Model metrics tab shows a card
    per key with a slider over its steps."""
    _client(handle.tracking_uri).log_image(handle.run_id, image, key=key, step=step)


def log_table(handle: RunHandle, data: dict[str, list[Any]], artifact_file: str) -> None:
    """A table (columns of equal length) as an MLflow table artifact (JSON, `artifact_file`
    ending in .json), which the UI shows as a table and compares across runs. MLflow appends
    the rows when the run already holds `artifact_file`."""
    import pandas as pd

    # Text columns as plain objects: MLflow looks for images among object columns, and pandas 3
    # warns when that look also matches its `str` columns.
    columns = {
        key: pd.Series(values, dtype=object if any(isinstance(v, str) for v in values) else None)
        for key, values in data.items()
    }
    frame = pd.DataFrame(columns)
    _client(handle.tracking_uri).log_table(handle.run_id, frame, artifact_file)


def set_description(handle: RunHandle, markdown: str) -> None:
    """The run's description (Markdown, shown at the top of the run page); MLflow caps tag
    values, so a longer text is cut with a note."""
    limit = 8000  # MLflow's MAX_TAG_VAL_LENGTH
    if len(markdown) > limit:
        note = "\n\n… (cut; the full text is in the run's artifacts)"
        markdown = markdown[: limit - len(note)] + note
    _client(handle.tracking_uri).set_tag(handle.run_id, DESCRIPTION_TAG, markdown)


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
