"""A plug-in family (`examples/ldm_sr`) on a cluster started with `ray start --head`: the driver
runs from another directory, so the package reaches the driver and the two Ray Train workers only
through `model.py_modules`; the export then reloads through `pipelines/upscale.py`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import ROOT, ray_head

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
EXAMPLE = ROOT / "examples" / "ldm_sr"


def run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_ldm_sr_plugin_trains_on_a_started_cluster_through_py_modules(tmp_path):
    workdir = tmp_path / "elsewhere"  # neither the repository nor the example
    workdir.mkdir()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",  # as the session's cluster (see test_job_submit.py)
    }
    env.pop("RAY_ADDRESS", None)
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
    with ray_head(env) as head:
        result = run(
            [*finetune, "--config", str(EXAMPLE / "finetune_tiny.yaml"), *overrides],
            workdir,
            {**env, "RAY_ADDRESS": head.gcs},
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
