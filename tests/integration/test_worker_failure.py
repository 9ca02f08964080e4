"""A Ray Train worker killed right after a checkpoint reaches storage (issue 13, item 3), in a
2-worker DDP run of `schedule.mode: trajectory_buffer` with gradient accumulation, then continued
by a re-run with more steps.

Ray registers a checkpoint with its controller only at the controller's next poll of the
workers (every 2 s), after rank 0 has copied it to storage. A worker killed in between leaves a
complete checkpoint that `ray.train.get_checkpoint()` of the retried worker group does not
return; the retry must still resume from it, and log no step twice into the MLflow run.

The trajectory buffer is not checkpointed: the retried worker group and the re-run each start
with an empty buffer and roll out at their first step, which the logged staleness shows. One
run covers both (each 2-worker fit costs ~40 s on 2 cores). The re-run continues on another
number of workers, Train's local mode (a rescaled cluster: the effective batch changes, and the
run says so); a new 2-worker group resuming from the checkpoint is the retry's.
"""

from __future__ import annotations

import math
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

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


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


def test_a_killed_worker_and_a_rerun_resume_ddp_and_rebuild_the_buffer(
    ray_cluster, tmp_path, base_model, caplog
):
    args = tiny_args(
        tmp_path,
        base_model,
        "killed",
        schedule__mode="trajectory_buffer",
        schedule__buffer__refresh_every=3,
        train__grad_accum=2,
        train__steps=4,
        train__checkpoint_every=2,
        train__validate_every=100,  # validations at step 0 and the last step of each run
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
    # The pyiqa reward term (gmsd) scored on both ranks' shards of the held-out pairs.
    rewards = client.get_metric_history(run.info.run_id, "val_reward_gmsd")
    assert [m.step for m in rewards] == [0, 4] and all(math.isfinite(m.value) for m in rewards)
    assert (run_dir / "checkpoint_00000004").is_dir()
    assert (run_dir / "model" / "rfsr_model.json").is_file()

    # A re-run with more steps continues the 2-worker run from its checkpoint, in the same run,
    # on one process (train.num_workers may change on resume).
    caplog.clear()
    assert finetune.main([*args, "train.steps=6", "train.num_workers=0"]) == 0
    assert "train.num_workers changed 2 → 0 on resume" in caplog.text
    client, rerun = only_run(tmp_path)
    assert rerun.info.run_id == run.info.run_id
    assert rerun.data.tags["rfsr.resume.2"].startswith("step 4 from ")
    loss_steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert loss_steps == [1, 2, 3, 4, 5, 6]
    history = {
        m.step: m.value for m in client.get_metric_history(run.info.run_id, "buffer_staleness")
    }
    # Without the two resumes it would read 0, 1, 2, 0, 1, 2 (one rollout every 3 steps); each
    # resumed process starts with an empty buffer and rolls out at its first step.
    assert history == {1: 0.0, 2: 1.0, 3: 0.0, 4: 1.0, 5: 0.0, 6: 1.0}
    sizes = client.get_metric_history(run.info.run_id, "buffer_mib")
    assert sizes and all(m.value > 0 for m in sizes)
    assert (run_dir / "checkpoint_00000006").is_dir()
