"""The demo as a user runs it (`configs/demo.yaml`, sizes shrunk) in its own process and its own
local Ray cluster: what it prints, what its 2-worker DDP run records in MLflow and in its run
folder, and what its MLflow run shows in a browser. One run serves every check: a 2-worker fit
costs ~40 s on 2 cores."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT
from tests.integration.mlflow_ui import CHROMIUM, check_run_in_ui, mlflow_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
STEPS = 3  # validations at 0, 2 and 3; checkpoints at 2 and 3


@dataclass(frozen=True)
class DemoRun:
    output: str  # stdout and stderr together, as a terminal shows them
    tracking_uri: str
    run_dir: Path


def demo_overrides(tmp_path: Path, base: Path) -> list[str]:
    """configs/demo.yaml with only sizes shrunk (and a smaller base, outputs under tmp_path)."""
    return [
        f"model.pretrained={base}",
        "data.patch_size=32",
        "data.crops_per_image=4",
        "data.val_size=2",
        "data.val_patch_size=64",  # held-out crops larger than the training patches
        "schedule.num_inference_steps=8",
        "losses.structure.window=[0,3]",
        "losses.reward.window=[6,7]",
        "losses.gram.window=[6,7]",
        f"train.steps={STEPS}",
        "train.validate_every=2",
        "train.checkpoint_every=2",
        "train.log_every=2",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.register_model=rfsr-demo",
        f"output.storage_path={tmp_path / 'runs'}",
    ]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, base_model) -> DemoRun:
    tmp_path = tmp_path_factory.mktemp("demo")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local cluster
    command = [sys.executable, "pipelines/finetune.py", "--config", "configs/demo.yaml"]
    result = subprocess.run(
        [*command, *demo_overrides(tmp_path, base_model)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=540,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    return DemoRun(result.stdout, f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "runs")


def normalise(line: str) -> str:
    """A line without what differs between processes and seconds: timestamps, pids, ANSI colour."""
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    line = re.sub(r"^\d{2}:\d{2}:\d{2} ", "", line)
    return re.sub(r"pid=\d+", "pid=N", line).strip()


def test_demo_prints_a_quiet_readable_console(demo_run):
    lines = [normalise(line) for line in demo_run.output.splitlines()]
    repeated = {line: count for line, count in Counter(filter(None, lines)).items() if count > 3}
    assert not repeated, f"lines repeated more than 3 times: {repeated}"
    text = "\n".join(lines)
    assert f"training demo_rfsr (rfsr, {STEPS} steps)" in text
    assert f"step {STEPS}/{STEPS} (100%)" in text  # the progress line (a bar on a terminal)
    assert re.search(r"ETA \d\d:\d\d · loss [-\d.e]+", text)
    for step in (0, 2, 3):
        assert re.search(rf"^validation {step}/{STEPS}: psnr [\d.]+ ", text, re.MULTILINE)
    assert "held-out validation, bicubic vs base vs fine-tuned" in text
    assert "| psnr ↑ |" in text
    # Ray's and the libraries' chatter stays out of the default console.
    # A traceback would be a Ray actor's (the demo shares the machine with the session's cluster).
    chatter = (
        "TrainingReport(",
        "State API",
        "Progress bars disabled",
        "pkg_resources",
        "Traceback",
    )
    for noise in chatter:
        assert noise not in text
    assert len(lines) < 80, text
    from PIL import Image

    grid = Image.open(demo_run.run_dir / "demo_rfsr" / "validation" / "grid_step_00000003.png")
    assert grid.width >= 4 * 128  # four labelled columns of 64² crops enlarged to 128²
    # The printed command and link open the run in the UI's model-training view.
    assert "mlflow ui --backend-store-uri sqlite:///" in text
    assert re.search(r"http://127\.0\.0\.1:5000/#/experiments/\d+/runs/\w+\?workflowType=", text)


def test_demo_run_records_params_metrics_checkpoints_and_the_exported_model(demo_run):
    """What the 2-worker DDP run (batch 1 × accumulation 2 per worker) leaves in MLflow and in
    its run folder, and that the export reloads and samples."""
    import json
    import math

    import torch
    from mlflow.tracking import MlflowClient

    from rfsr_ray.config import load_config
    from rfsr_ray.eval.run import training_run_id
    from rfsr_ray.models import load_model

    client = MlflowClient(demo_run.tracking_uri)
    experiment = client.get_experiment_by_name("rfsr_ray_demo")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.steps"] == str(STEPS) and params["train.num_workers"] == "2"
    assert params["train.grad_accum"] == "2"
    assert params["losses.gram.allow_random_vgg"] == "True" and "version.torch" in params
    for name in (
        "loss",
        "grad_norm",
        "lr",
        "samples_per_s",
        "data_wait_fraction",
        "val_psnr",
        "val_reward_ssim",
        "val_piqe",  # a held-out metric of the reward-hacking monitor
        "val_hacking_streak",
        "data_pairs",
    ):
        history = client.get_metric_history(run.info.run_id, name)
        assert history and all(math.isfinite(m.value) for m in history), name
    assert {m.step for m in client.get_metric_history(run.info.run_id, "val_psnr")} == {0, 2, 3}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"images", "final_table.md", "final_table.json", "timesteps.json"} <= artifacts
    assert "| psnr ↑ |" in run.data.tags["mlflow.note.content"]  # the table as description
    (model,) = client.search_logged_models([experiment.experiment_id])
    assert model.source_run_id == run.info.run_id and model.status == "READY"
    run_dir = demo_run.run_dir / "demo_rfsr"
    # The index → timestep map the loss windows refer to, recorded once with the run.
    timesteps = json.loads((run_dir / "timesteps.json").read_text())["timesteps"]
    assert len(timesteps) == 8 and timesteps == sorted(timesteps, reverse=True)
    assert params["rfsr.timesteps_head_tail"].startswith(f"0→{timesteps[0]}, 1→{timesteps[1]}")
    assert training_run_id(run_dir / "model") == run.info.run_id  # evaluation links back
    assert training_run_id(run_dir / "checkpoint_00000003") == run.info.run_id
    exported = load_model(run_dir / "model")
    sr = exported.sample(torch.rand(1, 3, 8, 8), 4, torch.Generator().manual_seed(0))
    assert sr.shape == (1, 3, 32, 32)
    assert load_config(run_dir / "model" / "config.yaml").train.steps == STEPS
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == [
        "checkpoint_00000002",
        "checkpoint_00000003",
    ]


def require_browser() -> None:
    """Chromium and Playwright are needed; CI fails without them, elsewhere the test skips."""
    missing = []
    if not CHROMIUM.is_file():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    try:
        import playwright  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install -e .[dev])")
    if missing:
        message = f"the MLflow UI check needs {' and '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def test_mlflow_ui_shows_the_run_with_charts_stepped_images_and_the_logged_model(
    demo_run, tmp_path
):
    """`mlflow server` on the demo's store, the run page in headless Chromium (screenshots in
    the test's tmp folder)."""
    require_browser()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(demo_run.tracking_uri)
    experiment = client.get_experiment_by_name("rfsr_ray_demo")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (run,) = client.search_runs([experiment.experiment_id])
    with mlflow_server(demo_run.tracking_uri) as base_url:
        text = check_run_in_ui(
            base_url,
            experiment.experiment_id,
            run.info.run_id,
            "demo_rfsr",
            "val_psnr",
            "validation",
            tmp_path / "run.png",
        )
    assert "rfsr-demo" in text  # the registered model, listed on the run's overview
    for shot in ("run.png", "run_metrics.png"):
        assert (tmp_path / shot).stat().st_size > 10_000
