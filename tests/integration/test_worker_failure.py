"""A Ray Train worker killed right after a checkpoint reaches storage (issue 13, item 3).

Ray registers a checkpoint with its controller only at the controller's next poll of the
workers (every 2 s), after rank 0 has copied it to storage. A worker killed in between leaves a
complete checkpoint that `ray.train.get_checkpoint()` of the retried worker group does not
return; the retry must still resume from it, and log no step twice into the MLflow run.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from pipelines import finetune
from rfsr_ray.train.checkpoint import is_complete
from tests.integration.conftest import only_run, tiny_args

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def train_workers() -> list[psutil.Process]:
    """This session's Ray Train worker processes (other Ray clusters on the machine are not
    descendants of this process)."""
    found = []
    for process in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:  # exited meanwhile
            continue
    return found


def kill_a_worker_when_complete(checkpoint: Path, killed: list[int]) -> None:
    """Poll storage and SIGKILL one train worker the moment `checkpoint` is complete."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        workers = train_workers() if is_complete(checkpoint) else []
        if workers:
            os.kill(workers[-1].pid, signal.SIGKILL)
            killed.append(workers[-1].pid)
            return
        time.sleep(0.005)


def test_a_worker_killed_right_after_a_checkpoint_resumes_from_it(
    ray_cluster, tmp_path, base_model
):
    args = tiny_args(
        tmp_path,
        base_model,
        "killed",
        train__steps=4,
        train__checkpoint_every=2,
        train__validate_every=100,  # validations at steps 0 and 4 only
        train__max_failures=2,
    )
    run_dir = tmp_path / "runs" / "killed"
    killed: list[int] = []
    killer = threading.Thread(
        target=kill_a_worker_when_complete, args=(run_dir / "checkpoint_00000002", killed)
    )
    killer.start()
    code = finetune.main(args)  # Ray Train wants the main thread
    killer.join()
    assert killed, "no train worker was found to kill"
    assert code == 0
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    # The retried group resumed at the checkpoint the killed one left, not at step 0.
    assert run.data.tags["rfsr.resume.1"].startswith("step 2 from ")
    assert "checkpoint_00000002" in run.data.tags["rfsr.resume.1"]
    assert "rfsr.resume.2" not in run.data.tags
    loss_steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert loss_steps == [1, 2, 3, 4]  # strictly increasing, the last step reached
    val_steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_psnr")]
    assert val_steps == [0, 4]  # step 0 is not validated again on the retry
    assert (run_dir / "checkpoint_00000004").is_dir()
    assert (run_dir / "model" / "rfsr_model.json").is_file()
