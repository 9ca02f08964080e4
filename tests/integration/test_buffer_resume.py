"""`schedule.mode: trajectory_buffer` through Ray Train: 2 DDP workers with gradient accumulation,
a run continued from its checkpoint, and the buffer rebuilt at the resume (it is not
checkpointed), which the logged staleness shows."""

from __future__ import annotations

import pytest

from pipelines import finetune
from tests.integration.conftest import only_run, tiny_args

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_the_buffer_serves_ddp_steps_and_is_rebuilt_after_a_resume(
    ray_cluster, tmp_path, base_model
):
    args = tiny_args(
        tmp_path,
        base_model,
        "buffered",
        schedule__mode="trajectory_buffer",
        schedule__buffer__refresh_every=3,
        train__grad_accum=2,
        train__steps=2,
        train__validate_every=4,
    )
    assert finetune.main(args) == 0  # steps 1-2, checkpoint at 2
    assert finetune.main([*args, "train.steps=4"]) == 0  # continues from step 2
    client, run = only_run(tmp_path)
    history = {
        m.step: m.value for m in client.get_metric_history(run.info.run_id, "buffer_staleness")
    }
    # Without the resume it would read 0, 1, 2, 0 (one rollout every 3 steps); the resumed
    # process starts with an empty buffer and rolls out at its first step.
    assert history == {1: 0.0, 2: 1.0, 3: 0.0, 4: 1.0}
    sizes = client.get_metric_history(run.info.run_id, "buffer_mib")
    assert sizes and all(m.value > 0 for m in sizes)
    assert (tmp_path / "runs" / "buffered" / "checkpoint_00000004").is_dir()
