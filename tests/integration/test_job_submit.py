"""`ray job submit` against a cluster started with `ray start --head`, beside the session's own
cluster. The test stops only the head it started: `ray stop` would end every Ray cluster on the
machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import RAY, ROOT, ray_head, tiny_args

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_ray_job_submit_runs_finetune_on_a_started_cluster(ray_cluster, tmp_path, base_model):
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        # The session's ray.init turned on Ray's token authentication and wrote the token to
        # ~/.ray/auth_token; the started head and the job client use the same token.
        "RAY_AUTH_MODE": "token",
    }
    env.pop("RAY_ADDRESS", None)
    # One worker: the job's Ray Train worker group still runs on the started cluster; DDP is
    # tested in test_training.py.
    args = tiny_args(tmp_path, base_model, "job", train__steps=2, train__num_workers=1)
    with ray_head(env) as head:
        submit = [
            RAY,
            "job",
            "submit",
            "--address",
            head.dashboard,
            "--working-dir",
            str(ROOT),
            "--",
            "python",
            "pipelines/finetune.py",
            *args,
        ]
        result = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    # `ray job submit` follows `ray job logs`: the same progress and validation lines as a local
    # run, without Ray Train's per-report lines.
    assert "step 2/2 (100%)" in result.stdout
    assert "validation 2/2: psnr" in result.stdout
    assert "TrainingReport(" not in result.stdout
    assert (tmp_path / "runs" / "job" / "model" / "rfsr_model.json").is_file()
    # Stopping the started head left the session's cluster running.
    assert ray_cluster.get(ray_cluster.remote(lambda: 1).remote()) == 1
