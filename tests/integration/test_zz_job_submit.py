"""`ray job submit` against a `ray start --head` cluster. Named to run last: `ray stop` ends every
Ray process on the machine, so the session's in-process cluster is shut down first."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_training import ROOT, tiny_args

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_ray_job_submit_runs_finetune_on_a_started_cluster(tmp_path, base_model):
    import ray

    ray.shutdown()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "RAY_ADDRESS": "",
    }
    env.pop("RAY_ADDRESS")
    ray_bin = str(Path(sys.executable).parent / "ray")
    temp_dir = Path("/tmp") / f"rfsr_ray_job_{os.getpid()}"
    start = [
        ray_bin,
        "start",
        "--head",
        "--port=6391",
        "--dashboard-port=8291",
        "--num-cpus=4",
        "--include-dashboard=true",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=120)
    try:
        args = tiny_args(tmp_path, base_model, "job", train__steps=2)
        submit = [
            ray_bin,
            "job",
            "submit",
            "--address",
            "http://127.0.0.1:8291",
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
        assert (tmp_path / "runs" / "job" / "model" / "rfsr_model.json").is_file()
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)
