"""MLflow as its users expect it, against a temporary SQLite store: the experiment kind, stepped
images, tables and descriptions, the logged pyfunc model (loaded back and run), the Model
Registry, per-node system metrics and the evaluation run's link to the logged model."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from rfsr_ray.errors import TrackingError
from rfsr_ray.eval import run as eval_run
from rfsr_ray.models import build_model
from rfsr_ray.tracking import logged_model, mlflow_run, system_metrics
from rfsr_ray.tracking.pyfunc import FALLBACK_STEPS
from tests.conftest import natural_image
from tests.integration.mlflow_ui import sqlite_store
from tests.unit.helpers import tiny_config

KIND = "mlflow.experimentKind"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return sqlite_store(tmp_path_factory.mktemp("mlflow"))


def config(store: str, experiment: str = "tracking", **sections: dict):
    return tiny_config(tracking={"uri": store, "experiment": experiment}, **sections)


@pytest.fixture(scope="module")
def export(tmp_path_factory, store) -> Path:
    """A tiny x4 model (random weights) exported with its config (8 inference steps)."""
    cfg = config(store)
    torch.manual_seed(0)
    path = build_model(cfg.model, 4).save(tmp_path_factory.mktemp("export") / "model")
    cfg.save(path / "config.yaml")
    return path


@pytest.fixture(scope="module")
def logged(store, export) -> tuple[mlflow_run.RunHandle, str]:
    """A run with metrics at steps 0 and 3 and the export logged as its model at step 3,
    registered as `rfsr-tiny`."""
    handle = mlflow_run.start_run(config(store), "train")
    mlflow_run.log_metrics(handle, {"loss": 0.5}, step=0)
    mlflow_run.log_metrics(handle, {"loss": 0.25, "val_psnr": 21.5}, step=3)
    model_id = logged_model.log_model(handle, export, register_as="rfsr-tiny", step=3)
    return handle, model_id


# ------------------------------------------------------------------ experiment kind
def test_a_new_experiment_is_a_model_training_experiment(store):
    handle = mlflow_run.start_run(config(store, "kind_new"), "r")
    experiment = MlflowClient(store).get_experiment(handle.experiment_id)
    assert experiment.tags[KIND] == "custom_model_development"


def test_an_existing_experiment_gets_the_kind_and_a_chosen_kind_stays(store):
    client = MlflowClient(store)
    bare = client.create_experiment("kind_bare")
    chosen = client.create_experiment("kind_chosen", tags={KIND: "genai_development"})
    mlflow_run.start_run(config(store, "kind_bare"), "r")
    mlflow_run.start_run(config(store, "kind_chosen"), "r")
    assert client.get_experiment(bare).tags[KIND] == "custom_model_development"
    assert client.get_experiment(chosen).tags[KIND] == "genai_development"


# ------------------------------------------------------------------ images, tables, description
def test_images_are_logged_under_their_key_at_their_step(store):
    handle = mlflow_run.start_run(config(store), "images")
    for step in (0, 2):
        mlflow_run.log_image(handle, natural_image(24, 32, seed=step), "validation", step)
    client = MlflowClient(store)
    names = [a.path for a in client.list_artifacts(handle.run_id, "images")]
    full = sorted(n for n in names if n.endswith(".png"))
    assert [n.split("+")[:3] for n in full] == [
        ["images/validation", "step", "0"],
        ["images/validation", "step", "2"],
    ]
    assert sum(n.endswith("compressed.webp") for n in names) == 2  # the UI's thumbnails
    assert client.get_run(handle.run_id).data.tags["mlflow.loggedImages"] == "True"


def test_a_table_and_the_description(store, tmp_path):
    handle = mlflow_run.start_run(config(store), "table")
    table = {"metric": ["psnr", "ssim"], "base": [20.0, 0.5], "fine-tuned": [21.0, 0.6]}
    mlflow_run.log_table(handle, table, "final_table.json")
    mlflow_run.set_description(handle, "## base vs fine-tuned\n| a | b |")
    client = MlflowClient(store)
    saved = json.loads(
        Path(client.download_artifacts(handle.run_id, "final_table.json")).read_text()
    )
    assert saved["columns"] == ["metric", "base", "fine-tuned"]
    assert saved["data"] == [["psnr", 20.0, 21.0], ["ssim", 0.5, 0.6]]
    tags = client.get_run(handle.run_id).data.tags
    assert tags["mlflow.note.content"] == "## base vs fine-tuned\n| a | b |"
    mlflow_run.set_description(handle, "x" * 9000)
    long = client.get_run(handle.run_id).data.tags["mlflow.note.content"]
    assert len(long) <= 8000 and long.startswith("x" * 7000) and "cut" in long


# ------------------------------------------------------------------ logged model
def test_the_logged_model_loads_and_super_resolves(store, logged, monkeypatch):
    _, model_id = logged
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    model = mlflow.pyfunc.load_model(f"models:/{model_id}")
    lr = np.stack([natural_image(10, 12, seed=s) for s in range(2)])
    sr = model.predict(lr, params={"num_inference_steps": 2, "seed": 3})
    assert sr.shape == (2, 40, 48, 3) and sr.dtype == np.uint8
    python_model = model.unwrap_python_model()
    one = python_model.predict(None, lr[0], {"num_inference_steps": 2, "seed": 3})
    assert one.shape == (40, 48, 3) and one.dtype == np.uint8
    again = python_model.predict(None, lr[0], {"num_inference_steps": 2, "seed": 3})
    np.testing.assert_array_equal(one, again)  # seeded
    with pytest.raises(ValueError, match="uint8 RGB"):
        python_model.predict(None, lr.astype(np.float32))


def test_the_logged_model_declares_what_it_takes(store, logged, monkeypatch):
    _, model_id = logged
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    info = mlflow.models.get_model_info(f"models:/{model_id}")
    signature = info.signature
    assert signature.inputs.to_dict()[0]["tensor-spec"] == {
        "dtype": "uint8",
        "shape": (-1, -1, -1, 3),
    }
    params = {p.name: p.default for p in signature.params}
    assert params == {"num_inference_steps": 8, "seed": 0}  # 8: the export's config.yaml
    assert info.saved_input_example_info["type"] == "ndarray"
    requirements = logged_model.pip_requirements()
    assert requirements[0].startswith("rfsr_ray==") and requirements[1].startswith("torch==")


def test_the_logged_model_belongs_to_the_run_with_its_metrics_and_version(store, logged):
    handle, model_id = logged
    client = MlflowClient(store)
    model = client.get_logged_model(model_id)
    assert str(model.status) == "READY" and model.source_run_id == handle.run_id
    assert {m.key: m.value for m in model.metrics} == {"loss": 0.25, "val_psnr": 21.5}
    assert model.params["train.lr"] == str(config(store).train.lr)
    outputs = client.get_run(handle.run_id).outputs.model_outputs
    assert [(o.model_id, o.step) for o in outputs] == [(model_id, 3)]
    versions = client.search_model_versions("name='rfsr-tiny'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", handle.run_id)]
    assert versions[0].source == model.artifact_location
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": "rfsr-tiny", "version": 1}]


def test_logging_a_model_leaves_mlflow_global_state_alone(store, export, tmp_path, monkeypatch):
    """As in a Ray worker: the process's own tracking URI points elsewhere, no run is active."""
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    handle = mlflow_run.start_run(config(store), "worker")
    model_id = logged_model.log_model(handle, export, name="sr")
    assert MlflowClient(store).get_logged_model(model_id).name == "sr"
    assert mlflow.active_run() is None and mlflow.get_tracking_uri() == elsewhere


def test_default_steps_without_a_saved_config(export, tmp_path):
    from rfsr_ray.tracking.pyfunc import default_steps

    assert default_steps(export) == 8
    assert default_steps(tmp_path) == FALLBACK_STEPS


def test_log_model_refuses_a_folder_that_is_no_export(store, tmp_path):
    handle = mlflow_run.start_run(config(store), "bad")
    with pytest.raises(TrackingError, match=r"rfsr_model\.json"):
        logged_model.log_model(handle, tmp_path)


# ------------------------------------------------------------------ system metrics
@pytest.mark.parametrize(
    ("mode", "use_gpu", "enabled", "expected"),
    [
        ("auto", True, True, True),
        ("auto", False, True, False),
        ("on", False, True, True),
        ("off", True, True, False),
        ("on", True, False, False),  # no tracking, no system metrics
    ],
)
def test_system_metrics_rule(store, mode, use_gpu, enabled, expected):
    cfg = tiny_config(
        tracking={"uri": store, "system_metrics": mode, "enabled": enabled},
        train={"use_gpu": use_gpu},
    )
    assert system_metrics.system_metrics_enabled(cfg) is expected


def test_each_node_logs_its_own_system_metrics(store, monkeypatch, caplog):
    """Two monitors (two nodes) into one run, each under its node id, without a warning on a
    machine without a GPU."""
    for variable in ("MLFLOW_SYSTEM_METRICS_NODE_ID", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
        monkeypatch.delenv(variable, raising=False)
    handle = mlflow_run.start_run(config(store), "system")
    client = MlflowClient(store)
    wanted = {f"system/{node}/cpu_utilization_percentage" for node in ("node_0", "node_1")}
    mlflow_logger = logging.getLogger("mlflow")  # MLflow's loggers do not propagate to root
    mlflow_logger.addHandler(caplog.handler)
    try:
        with system_metrics.start_system_metrics(handle, "node_0", sampling_interval=0.1) as node_0:
            node_1 = system_metrics.start_system_metrics(handle, "node_1", 0.1)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not wanted <= _metric_keys(client, handle):
                time.sleep(0.2)  # waits for the first samples; the time is not asserted
            node_1.finish()
        assert node_0.monitor._process is None  # the with block stopped it
    finally:
        mlflow_logger.removeHandler(caplog.handler)
    keys = _metric_keys(client, handle)
    for node in ("node_0", "node_1"):
        assert f"system/{node}/cpu_utilization_percentage" in keys
        assert f"system/{node}/system_memory_usage_megabytes" in keys
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _metric_keys(client: MlflowClient, handle: mlflow_run.RunHandle) -> set[str]:
    return set(client.get_run(handle.run_id).data.metrics)


# ------------------------------------------------------------------ evaluation link
def test_the_evaluation_run_links_the_logged_model(store, logged, tmp_path):
    _, model_id = logged
    export = tmp_path / "tuned"
    export.mkdir()
    (export / "training_run.json").write_text(json.dumps({"run_id": "r", "model_id": model_id}))
    assert eval_run.logged_model_id(export) == model_id and eval_run.training_run_id(export) == "r"
    assert eval_run.logged_model_id(tmp_path) is None
    models = [
        eval_run.ModelInfo("base", "base", 4, 8, None),
        eval_run.ModelInfo("tuned", str(export), 4, 8, "r", model_id),
        eval_run.ModelInfo("other", "other", 4, 8, None, "m-not-in-this-store"),
    ]
    metrics = {"set.base.psnr": 20.0, "set.tuned.psnr": 21.0, "set.delta.tuned.psnr": 1.0}
    handle = mlflow_run.start_run(config(store), "eval")
    eval_run._log_metrics(handle, models, metrics, ["set"])
    client = MlflowClient(store)
    run = client.get_run(handle.run_id)
    assert [m.model_id for m in run.inputs.model_inputs] == [model_id]
    assert run.data.metrics == metrics
    evaluated = {m.key: m.value for m in client.get_logged_model(model_id).metrics}
    assert evaluated["set.tuned.psnr"] == 21.0 and "set.base.psnr" not in evaluated
