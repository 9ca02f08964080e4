"""`ray job submit` against a cluster started with `ray start --head`, beside the session's own
cluster. The test stops only the head it started: `ray stop` would end every Ray cluster on the
machine."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
import pytest

from tests.integration.conftest import ROOT, tiny_args

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
RAY = str(Path(sys.executable).parent / "ray")


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


@contextmanager
def ray_head(env: dict[str, str]) -> Iterator[str]:
    """A `ray start --head --block` cluster on free ports; yields its dashboard address. With
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
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        kill_process_tree(head.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


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
    with ray_head(env) as address:
        submit = [
            RAY,
            "job",
            "submit",
            "--address",
            address,
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
