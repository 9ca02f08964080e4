from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import finetune, pretrain, upscale
from rfsr_ray.config import load_config
from rfsr_ray.errors import TrackingError
from rfsr_ray.eval.run import training_run_id
from rfsr_ray.models import load_model
from rfsr_ray.tracking.mlflow_run import check_reachable
from tests.conftest import natural_image

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[2]


def tiny_args(tmp_path: Path, base: Path, run_name: str = "run", **extra: object) -> list[str]:
    args = {
        "data.sources": "[builtin:astronaut+rocket]",
        "data.patch_size": 32,
        "data.crops_per_image": 4,
        "data.batch_size": 4,
        "data.val_source": "builtin:coffee",
        "data.val_size": 2,
        "degradation.preset": "bicubic",
        "model.pretrained": str(base),
        "schedule.num_inference_steps": 4,
        "losses.structure.window": "[0,1]",
        "losses.reward.window": "[2,3]",
        "losses.gram.window": "[3,3]",
        "losses.gram.allow_random_vgg": "true",
        "losses.reward.terms": "[{name: gmsd, weight: 0.1}]",
        "train.steps": 3,
        "train.batch_size": 2,
        "train.grad_accum": 1,
        "train.lr": 1e-4,
        "train.num_workers": 2,
        "train.cpus_per_worker": 0.5,
        "train.checkpoint_every": 2,
        "train.validate_every": 2,
        "train.log_every": 1,
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "output.storage_path": str(tmp_path / "runs"),
        "output.run_name": run_name,
    }
    args.update({key.replace("__", "."): value for key, value in extra.items()})
    return [f"{key}={value}" for key, value in args.items()]


def mlflow_client(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def only_run(tmp_path: Path):
    client = mlflow_client(tmp_path)
    experiment = client.get_experiment_by_name("rfsr_ray")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_two_worker_finetune_logs_to_mlflow(ray_cluster, tmp_path, base_model, capsys):
    assert finetune.main(tiny_args(tmp_path, base_model)) == 0
    out = capsys.readouterr().out
    assert "base vs fine-tuned" in out and "mlflow ui --backend-store-uri sqlite:///" in out
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.steps"] == "3" and params["train.num_workers"] == "2"
    assert params["losses.gram.allow_random_vgg"] == "True" and "version.torch" in params
    for name in (
        "loss",
        "grad_norm",
        "lr",
        "samples_per_s",
        "data_wait_fraction",
        "val_psnr",
        "val_reward_gmsd",
        "val_piqe",  # a held-out metric of the reward-hacking monitor
        "val_hacking_streak",
        "data_pairs",
    ):
        history = client.get_metric_history(run.info.run_id, name)
        assert history and all(math.isfinite(m.value) for m in history), name
    assert {m.step for m in client.get_metric_history(run.info.run_id, "val_psnr")} == {0, 2, 3}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "validation", "final_table.md", "timesteps.json"} <= artifacts
    run_dir = tmp_path / "runs" / "run"
    # The index → timestep map the loss windows refer to, recorded once with the run.
    timesteps = json.loads((run_dir / "timesteps.json").read_text())["timesteps"]
    assert len(timesteps) == 4 and timesteps == sorted(timesteps, reverse=True)
    assert params["rfsr.timesteps_head_tail"].startswith(f"0→{timesteps[0]}, 1→{timesteps[1]}")
    assert training_run_id(run_dir / "model") == run.info.run_id  # evaluation links back
    assert training_run_id(run_dir / "checkpoint_00000003") == run.info.run_id
    exported = load_model(run_dir / "model")
    sr = exported.sample(torch.rand(1, 3, 8, 8), 4, torch.Generator().manual_seed(0))
    assert sr.shape == (1, 3, 32, 32)
    assert load_config(run_dir / "model" / "config.yaml").train.steps == 3
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == [
        "checkpoint_00000002",
        "checkpoint_00000003",
    ]


def test_resume_continues_from_the_checkpoint_in_the_same_run(ray_cluster, tmp_path, base_model):
    args = tiny_args(tmp_path, base_model, "resumable", train__steps=2)
    assert finetune.main(args) == 0
    _, first = only_run(tmp_path)
    assert finetune.main([*args, "train.steps=4"]) == 0
    client, second = only_run(tmp_path)
    assert second.info.run_id == first.info.run_id
    steps = [m.step for m in client.get_metric_history(second.info.run_id, "loss")]
    assert sorted(steps) == [1, 2, 3, 4]  # steps 3-4 continue the run; step 1 is not redone
    assert (tmp_path / "runs" / "resumable" / "checkpoint_00000004").is_dir()


def test_a_rerun_with_a_changed_config_is_refused_unless_resumed(
    ray_cluster, tmp_path, base_model, capsys
):
    args = tiny_args(tmp_path, base_model, "changed", train__steps=2)
    assert finetune.main(args) == 0
    _, first = only_run(tmp_path)
    capsys.readouterr()
    changed = [*args, "train.lr=2e-4", "train.steps=4"]  # train.steps may change, lr may not
    assert finetune.main(changed) == 2  # refused before Ray, data or MLflow start
    err = capsys.readouterr().err
    assert "output.run_name='changed' already has a checkpoint at step 2" in err
    assert "train.lr: 0.0001 → 0.0002" in err and "train.steps" not in err
    assert "pick a new output.run_name, or pass --resume" in err
    run_dir = tmp_path / "runs" / "changed"
    assert load_config(run_dir / "config.yaml").train.lr == 1e-4  # not overwritten
    assert finetune.main(["--resume", *changed]) == 0
    client, second = only_run(tmp_path)
    assert second.info.run_id == first.info.run_id
    steps = [m.step for m in client.get_metric_history(second.info.run_id, "loss")]
    assert steps == [1, 2, 3, 4]
    assert load_config(run_dir / "config.yaml").train.lr == 2e-4
    assert load_config(run_dir / "config.until_step_00000002.yaml").train.lr == 1e-4
    assert "train.lr: 0.0001 → 0.0002" in second.data.tags["rfsr.config_change.step_2"]
    assert second.data.tags["rfsr.resume.1"].startswith("step 2 from ")
    artifacts = {a.path for a in client.list_artifacts(second.info.run_id)}
    assert "config.until_step_00000002.yaml" in artifacts


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
