"""MLflow 3 logged models: an exported rfsr_ray model as a pyfunc model of its training run,
optionally registered, and evaluation runs linked to it.

Everything goes through `MlflowClient` with the run's tracking URI (no fluent active run, no
global tracking URI), so it works the same on the driver and in a Ray worker.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from rfsr_ray.errors import TrackingError
from rfsr_ray.models.tiny import MODEL_INFO_FILE
from rfsr_ray.tracking.mlflow_run import RunHandle, _client

# What the model needs at inference; pinned to this environment so that MLflow does not infer
# requirements (which loads the model in a subprocess and costs tens of seconds).
REQUIREMENT_PACKAGES = ("rfsr_ray", "torch")
EXAMPLE_SIZE = 16  # sides of the logged input example, LR pixels
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # on a logged model: its registered versions
PROGRESS_BAR_VARIABLE = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def log_model(
    handle: RunHandle,
    export_dir: str | Path,
    name: str = "model",
    register_as: str | None = None,
    step: int = 0,
) -> str:
    """Log the exported model folder `export_dir` (what `rfsr_ray.models.load_model` loads) as an
    MLflow pyfunc model output by the run at `step`; the run's metrics at `step` and its params
    are copied onto the model. With `register_as`, also register it in the Model Registry under
    that name. Returns the model id (`models:/<model_id>` loads it)."""
    from mlflow.entities import LoggedModelOutput

    export_dir = Path(export_dir)
    if not (export_dir / MODEL_INFO_FILE).is_file():
        raise TrackingError(
            f"{str(export_dir)!r} is not an exported rfsr_ray model (no {MODEL_INFO_FILE}); pass "
            "the `model/` folder of a finished run"
        )
    client = _client(handle.tracking_uri)
    run = client.get_run(handle.run_id)
    info = json.loads((export_dir / MODEL_INFO_FILE).read_text())
    model = client.create_logged_model(
        handle.experiment_id,
        name=name,
        source_run_id=handle.run_id,
        params=dict(run.data.params),
        tags={"rfsr.family": str(info["family"]), "rfsr.scale": str(info["scale"])},
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "model"
            _save_pyfunc(local, export_dir, handle.run_id, model)
            client.log_model_artifacts(model.model_id, str(local))
        client.log_outputs(handle.run_id, [LoggedModelOutput(model.model_id, step=step)])
        _copy_step_metrics(client, run, model.model_id, step)
    except BaseException:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    if register_as:
        register_model(handle, model.model_id, register_as)
    return model.model_id


def _save_pyfunc(local: Path, export_dir: Path, run_id: str, model: Any) -> None:
    """Write the pyfunc model (the export as its artifact, signature, input example, pinned
    requirements) to the local folder `local`, stamped with the logged model's ids."""
    import mlflow.pyfunc
    from mlflow.models import Model

    from rfsr_ray.tracking import pyfunc

    with _artifact_progress_bars_off():  # a bar per copied file is noise in a worker's log
        mlflow.pyfunc.save_model(
            str(local),
            python_model=str(Path(pyfunc.__file__).with_name("pyfunc_entry.py")),
            artifacts={pyfunc.EXPORT_ARTIFACT: str(export_dir)},
            signature=signature(pyfunc.default_steps(export_dir)),
            input_example=input_example(),
            pip_requirements=pip_requirements(),
            mlflow_model=Model(
                artifact_path=model.artifact_location,
                run_id=run_id,
                model_uuid=model.model_id,
                model_id=model.model_id,
            ),
        )


@contextmanager
def _artifact_progress_bars_off() -> Iterator[None]:
    previous = os.environ.get(PROGRESS_BAR_VARIABLE)
    os.environ[PROGRESS_BAR_VARIABLE] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(PROGRESS_BAR_VARIABLE, None)
        else:
            os.environ[PROGRESS_BAR_VARIABLE] = previous


def input_example() -> np.ndarray:
    """A small LR batch, uint8 (1, EXAMPLE_SIZE, EXAMPLE_SIZE, 3): a colour ramp."""
    ramp = np.linspace(0, 255, EXAMPLE_SIZE * EXAMPLE_SIZE * 3).astype(np.uint8)
    return ramp.reshape(1, EXAMPLE_SIZE, EXAMPLE_SIZE, 3)


def signature(default_steps: int) -> Any:
    """uint8 (N, h, w, 3) → uint8 (N, H, W, 3); params `num_inference_steps` and `seed`."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    images = TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))
    return ModelSignature(
        inputs=Schema([images]),
        outputs=Schema([images]),
        params=ParamSchema(
            [ParamSpec("num_inference_steps", "long", default_steps), ParamSpec("seed", "long", 0)]
        ),
    )


def pip_requirements() -> list[str]:
    """The installed versions of what the pyfunc model imports."""
    return [f"{package}=={metadata.version(package)}" for package in REQUIREMENT_PACKAGES]


def _copy_step_metrics(client: Any, run: Any, model_id: str, step: int) -> None:
    """The run's latest metrics logged at `step` also become the model's (as MLflow's own
    `log_model(step=…)` does), so the logged model's page shows how it validated."""
    from mlflow.entities import Metric

    metrics = [
        Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id)
        for m in run.data._metric_objs
        if m.step == step
    ]
    for start in range(0, len(metrics), 500):
        client.log_batch(run.info.run_id, metrics=metrics[start : start + 500])


def register_model(handle: RunHandle, model_id: str, name: str) -> str:
    """Register logged model `model_id` under `name` (created when missing); returns the new
    version number."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=handle.tracking_uri, registry_uri=handle.tracking_uri)
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    # The artifact location, not `models:/<id>`: MLflow's SQL registry resolves a models:/ source
    # through the process-global tracking URI, which a Ray worker need not have set.
    source = client.get_logged_model(model_id).artifact_location
    version = client.create_model_version(
        name, source=source, run_id=handle.run_id, model_id=model_id
    )
    # The logged model's side of the link, as mlflow.register_model records it.
    model = client.get_logged_model(model_id)
    versions = json.loads(model.tags.get(MODEL_VERSIONS_TAG, "[]"))
    versions.append({"name": name, "version": version.version})
    client.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: json.dumps(versions)})
    return str(version.version)


def link_logged_models(handle: RunHandle, model_ids: list[str]) -> list[str]:
    """Record logged models as inputs of the run `handle` (an evaluation run); ids that this
    tracking store does not hold are left out. Returns the linked ids."""
    from mlflow.entities import LoggedModelInput
    from mlflow.exceptions import MlflowException

    client = _client(handle.tracking_uri)
    linked = []
    for model_id in dict.fromkeys(model_ids):
        try:
            client.get_logged_model(model_id)
        except MlflowException:
            continue
        linked.append(model_id)
    if linked:
        client.log_inputs(handle.run_id, models=[LoggedModelInput(m) for m in linked])
    return linked
