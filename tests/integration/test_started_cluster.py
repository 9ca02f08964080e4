"""Runs on one cluster started with `ray start --head`, beside the session's own cluster:

- `ray job submit` of `pipelines/finetune.py` (the command a user runs on a cluster);
- a plug-in family (`examples/ldm_sr`) whose driver runs from another directory, so the package
  reaches the driver and the two Ray Train workers only through `model.py_modules`; the export
  then reloads through `pipelines/upscale.py`.

The two share the head (module fixture): starting and stopping one costs ~15 s. The fixture stops
only the head it started (`ray stop` would end every Ray cluster on the machine) and checks that
the session's cluster still runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import RAY, ROOT, RayHead, ray_head, tiny_args

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
EXAMPLE = ROOT / "examples" / "ldm_sr"


@pytest.fixture(scope="module")
def head_env() -> dict[str, str]:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        # The session's ray.init turned on Ray's token authentication and wrote the token to
        # ~/.ray/auth_token; the started head and its clients use the same token.
        "RAY_AUTH_MODE": "token",
    }
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def started_head(ray_cluster, head_env) -> Iterator[RayHead]:
    with ray_head(head_env) as head:
        yield head
    # Stopping the started head left the session's cluster running.
    assert ray_cluster.get(ray_cluster.remote(lambda: 1).remote()) == 1


def test_ray_job_submit_runs_finetune_on_a_started_cluster(
    started_head, head_env, tmp_path, base_model
):
    # One worker: the job's Ray Train worker group still runs on the started cluster; DDP is
    # tested in test_training.py.
    args = tiny_args(tmp_path, base_model, "job", train__steps=2, train__num_workers=1)
    submit = [
        RAY,
        "job",
        "submit",
        "--address",
        started_head.dashboard,
        "--working-dir",
        str(ROOT),
        "--",
        "python",
        "pipelines/finetune.py",
        *args,
    ]
    result = subprocess.run(submit, env=head_env, capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    # `ray job submit` follows `ray job logs`: the same progress and validation lines as a local
    # run, without Ray Train's per-report lines.
    assert "step 2/2 (100%)" in result.stdout
    assert "validation 2/2: psnr" in result.stdout
    assert "TrainingReport(" not in result.stdout
    assert (tmp_path / "runs" / "job" / "model" / "rfsr_model.json").is_file()


def run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_ldm_sr_plugin_trains_on_a_started_cluster_through_py_modules(
    started_head, head_env, tmp_path
):
    workdir = tmp_path / "elsewhere"  # neither the repository nor the example
    workdir.mkdir()
    env = head_env
    assert str(EXAMPLE) not in env.get("PYTHONPATH", "")
    base = tmp_path / "ldm_sr_tiny"
    run([sys.executable, str(EXAMPLE / "make_tiny.py"), "--out", str(base)], workdir, env)
    overrides = [
        f"model.pretrained={base}",
        f"model.py_modules=[{EXAMPLE / 'ldm_sr_family'}]",
        "train.steps=2",
        "train.checkpoint_every=2",
        "train.validate_every=2",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"output.storage_path={tmp_path / 'runs'}",
        "output.run_name=ldm",
    ]
    finetune = [sys.executable, str(ROOT / "pipelines" / "finetune.py")]
    result = run(
        [*finetune, "--config", str(EXAMPLE / "finetune_tiny.yaml"), *overrides],
        workdir,
        {**env, "RAY_ADDRESS": started_head.gcs},
    )
    assert "step 2/2 (100%)" in result.stdout + result.stderr
    assert "validation 2/2: psnr" in result.stdout + result.stderr
    export = tmp_path / "runs" / "ldm" / "model"
    info = json.loads((export / "rfsr_model.json").read_text())
    assert (info["family"], info["builder"], info["name"]) == (
        "plugin",
        "ldm_sr_family:build",
        "ldm_sr",
    )

    # The export alone reloads: upscale.py in a fresh process, from the same foreign directory.
    photos = tmp_path / "photos"
    photos.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(photos / "a.png")
    upscale = [sys.executable, str(ROOT / "pipelines" / "upscale.py")]
    out = tmp_path / "upscaled"
    run(
        [*upscale, f"infer.model={export}", f"infer.input={photos}", f"infer.output={out}",
         "infer.num_inference_steps=2"],
        workdir,
        env,
    )  # fmt: skip
    assert Image.open(out / "a.png").size == (64, 48)
