"""`ray job submit` on a cluster started with `ray start --head`, beside the session's own
cluster: the command a user runs on a cluster, with a plug-in family (`examples/ldm_sr`) whose
package reaches the job's driver and its two Ray Train workers only through `model.py_modules`
(the job's working directory, the repository, does not hold it on any import path). The export
then reloads through `pipelines/upscale.py` in a fresh process from another directory.

One job covers both (each fit costs ~40 s on 2 cores). The fixture stops only the head it
started (`ray stop` would end every Ray cluster on the machine) and checks that the session's
cluster still runs. Drivers joining a started cluster through $RAY_ADDRESS outside a job:
test_tune.py's killed-sweep test and test_cluster_address.py."""

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

from tests.integration.conftest import RAY, ROOT, RayHead, ray_head, tracking_uri

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


def run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_ray_job_submit_trains_a_plugin_family_shipped_by_py_modules(
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
        f"tracking.uri={tracking_uri(tmp_path)}",
        f"output.storage_path={tmp_path / 'runs'}",
        "output.run_name=ldm",
    ]
    config = EXAMPLE.relative_to(ROOT) / "finetune_tiny.yaml"  # inside the working directory
    submit = [RAY, "job", "submit", "--address", started_head.dashboard, "--working-dir",
              str(ROOT), "--", "python", "pipelines/finetune.py", "--config", str(config),
              *overrides]  # fmt: skip
    result = run(submit, workdir, env)
    assert "succeeded" in result.stdout
    # `ray job submit` follows `ray job logs`: the same progress and validation lines as a local
    # run, without Ray Train's per-report lines.
    assert "step 2/2 (100%)" in result.stdout
    assert "validation 2/2: psnr" in result.stdout
    assert "TrainingReport(" not in result.stdout
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
