"""Fixtures and helpers shared by the integration tests: a tiny base model, the override list of a
tiny fine-tune, and the MLflow store those fine-tunes log to."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from rfsr_ray.config import build_config
from tests.integration.mlflow_ui import sqlite_store

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def save_tiny_model(folder: Path, seed: int) -> Path:
    """A tiny randomly initialised x4 model saved like a pretrain export, in `folder/tiny_x4`."""
    # Imported here: sweep tests define trial functions in their modules, so every trial actor
    # imports this file, and the models would cost each one ~8 s of CPU.
    import torch

    from rfsr_ray.models import build_model

    cfg = build_config(
        {"model": {"tiny": {"block_out_channels": [16, 32], "prediction_type": "sample"}}}
    )
    torch.manual_seed(seed)
    path = folder / "tiny_x4"
    build_model(cfg.model, 4).save(path)
    return path


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("base"), seed=0)


def tiny_args(tmp_path: Path, base: Path, run_name: str = "run", **extra: object) -> list[str]:
    """`key=value` overrides of a 3-step, 2-worker fine-tune of the tiny model `base` on builtin
    images, logging to `tmp_path/mlflow.db`; `extra` adds or replaces keys (`train__steps=2`)."""
    args = {
        "data.sources": "[builtin:astronaut+rocket]",
        "data.patch_size": 32,
        "data.crops_per_image": 4,
        "data.batch_size": 4,
        "data.val_source": "builtin:coffee",
        "data.val_size": 2,
        "degradation.preset": "bicubic",
        "model.pretrained": str(base),
        "schedule.num_inference_steps": 4,
        "losses.structure.window": "[0,1]",
        "losses.reward.window": "[2,3]",
        "losses.gram.window": "[3,3]",
        "losses.gram.allow_random_vgg": "true",
        "losses.reward.terms": "[{name: gmsd, weight: 0.1}]",
        "train.steps": 3,
        "train.batch_size": 2,
        "train.grad_accum": 1,
        "train.lr": 1e-4,
        "train.num_workers": 2,
        "train.cpus_per_worker": 0.5,
        "train.checkpoint_every": 2,
        "train.validate_every": 2,
        "train.log_every": 1,
        "tracking.uri": tracking_uri(tmp_path),
        "output.storage_path": str(tmp_path / "runs"),
        "output.run_name": run_name,
    }
    args.update({key.replace("__", "."): value for key, value in extra.items()})
    return [f"{key}={value}" for key, value in args.items()]


def tracking_uri(tmp_path: Path) -> str:
    """The URI of the SQLite store `tmp_path/mlflow.db`, made on first use as a copy of an empty
    store migrated once per MLflow version (`mlflow_ui.sqlite_store`): a new store runs MLflow's
    schema migrations, ~1.7 s in this process and more in a fresh one, in every test. A run's
    first store is still made from nothing where that is the subject: the demo run's."""
    path = tmp_path / "mlflow.db"
    return f"sqlite:///{path}" if path.exists() else sqlite_store(tmp_path)


def mlflow_client(tmp_path: Path):
    """A client of the MLflow store `tiny_args(tmp_path, ...)` logs to."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(tmp_path))


def only_run(tmp_path: Path):
    """(client, run) of the single run in the `rfsr_ray` experiment; fails if there are more."""
    client = mlflow_client(tmp_path)
    experiment = client.get_experiment_by_name("rfsr_ray")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


# ------------------------------------------------------------------ a second cluster
def free_ports(count: int) -> list[int]:
    """Ports free right now, so the head collides with no other cluster on the machine."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def kill_process_tree(pid: int) -> None:
    """SIGKILL `pid` and every descendant (GCS, raylet, dashboard, workers): `ray stop --force`
    for one cluster. Some of its processes outlived SIGTERM by 20 s; nothing here needs a graceful
    stop."""
    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    for process in processes:
        with suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(processes, timeout=30)


@dataclass(frozen=True)
class RayHead:
    dashboard: str  # http://…, what `ray job submit --address` takes
    gcs: str  # host:port, what a driver's RAY_ADDRESS takes


@contextmanager
def ray_head(env: dict[str, str]) -> Iterator[RayHead]:
    """A `ray start --head --block` cluster on free ports; yields its addresses. With
    --block, every process of the cluster descends from the command, so stopping its process
    tree stops this cluster and no other."""
    gcs, dashboard, agent, client = free_ports(4)
    temp_dir = Path(tempfile.mkdtemp(prefix="rfsr_ray_job_"))  # short: it holds Unix sockets
    log_path = temp_dir / "ray_start.log"
    command = [
        RAY,
        "start",
        "--head",
        "--block",
        f"--port={gcs}",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent}",
        f"--ray-client-server-port={client}",
        "--num-cpus=4",
        "--include-dashboard=true",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    with log_path.open("w") as log:
        head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        # Printed once every process has started, before the command blocks.
        while "block forever" not in log_path.read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start --head did not come up:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield RayHead(f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs}")
    finally:
        kill_process_tree(head.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
