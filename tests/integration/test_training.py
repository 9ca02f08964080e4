from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import finetune, pretrain, upscale
from rfsr_ray.config import load_config
from rfsr_ray.errors import TrackingError
from rfsr_ray.tracking.mlflow_run import check_reachable
from tests.conftest import natural_image
from tests.integration.conftest import (
    only_run,
    tiny_args,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_a_rerun_continues_the_run_and_a_changed_config_needs_resume(
    ray_cluster, tmp_path, base_model, capsys
):
    """Re-running a run name with more steps continues it from its checkpoint in the same MLflow
    run; a changed training key is refused unless --resume, which keeps the old config. Train's
    local mode (the driver's rerun logic is what is tested; test_worker_failure.py continues a
    2-worker DDP run from Ray's copy of its checkpoint), which writes its checkpoints into the
    run folder itself, keeping train.keep_checkpoints of them."""
    args = tiny_args(tmp_path, base_model, "resumable", train__steps=2, train__num_workers=0)
    run_dir = tmp_path / "runs" / "resumable"
    assert finetune.main(args) == 0
    _, first = only_run(tmp_path)
    assert finetune.main([*args, "train.steps=3"]) == 0
    client, second = only_run(tmp_path)
    assert second.info.run_id == first.info.run_id
    steps = [m.step for m in client.get_metric_history(second.info.run_id, "loss")]
    assert sorted(steps) == [1, 2, 3]  # step 3 continues the run; steps 1-2 are not redone
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == [
        "checkpoint_00000002",
        "checkpoint_00000003",
    ]

    capsys.readouterr()
    changed = [*args, "train.lr=2e-4", "train.steps=4"]  # train.steps may change, lr may not
    assert finetune.main(changed) == 2  # refused before Ray, data or MLflow start
    err = capsys.readouterr().err
    assert "output.run_name='resumable' already has a checkpoint at step 3" in err
    assert "train.lr: 0.0001 → 0.0002" in err and "train.steps" not in err
    assert "pick a new output.run_name, or pass --resume" in err
    assert load_config(run_dir / "config.yaml").train.lr == 1e-4  # not overwritten
    assert finetune.main(["--resume", *changed]) == 0
    client, third = only_run(tmp_path)
    assert third.info.run_id == first.info.run_id
    steps = [m.step for m in client.get_metric_history(third.info.run_id, "loss")]
    assert steps == [1, 2, 3, 4]
    assert load_config(run_dir / "config.yaml").train.lr == 2e-4
    assert load_config(run_dir / "config.until_step_00000003.yaml").train.lr == 1e-4
    assert "train.lr: 0.0001 → 0.0002" in third.data.tags["rfsr.config_change.step_3"]
    assert third.data.tags["rfsr.resume.1"].startswith("step 2 from ")
    assert third.data.tags["rfsr.resume.2"].startswith("step 3 from ")
    artifacts = {a.path for a in client.list_artifacts(third.info.run_id)}
    assert "config.until_step_00000003.yaml" in artifacts


def test_train_local_mode_runs_the_worker_loop_in_process(ray_cluster, tmp_path, base_model):
    args = tiny_args(
        tmp_path,
        base_model,
        "local",
        train__num_workers=0,
        tracking__enabled="false",
        train__steps=2,
    )
    assert finetune.main(args) == 0
    assert (tmp_path / "runs" / "local" / "model" / "rfsr_model.json").is_file()


def test_pretrain_denoise_objective(ray_cluster, tmp_path):
    args = [
        a
        for a in tiny_args(tmp_path, Path("unused"), "pretrain")
        if not a.startswith("model.pretrained")
    ]
    args += [
        "train.loss=denoise",
        "model.tiny.block_out_channels=[16,32]",
        "tracking.enabled=false",
        "train.num_workers=0",  # the objective is tested here, DDP elsewhere
    ]
    assert pretrain.main(args) == 0
    assert (tmp_path / "runs" / "pretrain" / "model" / "unet").is_dir()


def test_unreachable_tracking_server_is_reported_before_training():
    with pytest.raises(TrackingError, match="unreachable"):
        check_reachable("http://127.0.0.1:9")


def test_upscale_writes_good_images_and_reports_the_bad_one(tmp_path, base_model, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for index in range(2):
        Image.fromarray(natural_image(12, 20, seed=index)).save(folder / f"good{index}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    code = upscale.main(
        [
            f"infer.model={base_model}",
            f"infer.input={folder}",
            f"infer.output={tmp_path / 'out'}",
            "infer.num_inference_steps=2",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "broken.jpg" in out and "skipped_corrupt=1" in out
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["good0.png", "good1.png"]
    assert np.asarray(Image.open(tmp_path / "out" / "good0.png")).shape == (48, 80, 3)


def test_hacking_monitor_stop_ends_the_run_early_with_an_export(
    ray_cluster, tmp_path, base_model, monkeypatch
):
    """Train's local mode runs the loop in this process, so the monitor can be fed a scripted
    trajectory (reward up, every held-out metric down) through its real bookkeeping."""
    import itertools

    from rfsr_ray.train.monitor import HackingMonitor

    real_update, calls = HackingMonitor.update, itertools.count()

    def scripted(self, reward, held_out):
        n = next(calls)
        return real_update(self, float(n), {name: -float(n) for name in held_out})

    monkeypatch.setattr(HackingMonitor, "update", scripted)
    args = tiny_args(
        tmp_path,
        base_model,
        "hacked",
        train__num_workers=0,
        train__steps=8,
        losses__monitor__stop="true",
    )
    assert finetune.main(args) == 0
    client, run = only_run(tmp_path)
    signal = client.get_metric_history(run.info.run_id, "val_hacking_signal")
    assert [(m.step, m.value) for m in signal] == [(0, 0.0), (2, 0.0), (4, 1.0)]
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 4  # steps 1-4 of 8
    assert (tmp_path / "runs" / "hacked" / "model" / "rfsr_model.json").is_file()
