"""A rerun of a run name with a changed training config is refused unless resumed explicitly;
checkpoints on storage count only when every file is there (issue 13, items 3 and 9)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from rfsr_ray.cli import build_parser, parse_config
from rfsr_ray.config import RFSRConfig, build_config
from rfsr_ray.errors import ConfigError
from rfsr_ray.models import build_model
from rfsr_ray.train.checkpoint import (
    COMPLETE_MARKER,
    Progress,
    config_hash,
    is_complete,
    latest_checkpoint,
    read_progress,
    save_checkpoint,
)
from rfsr_ray.train.driver import find_resume
from rfsr_ray.train.step import build_state


def config(tmp_path: Path, **train: object) -> RFSRConfig:
    return build_config(
        {
            "model": {"tiny": {"block_out_channels": [8, 16], "norm_num_groups": 4}},
            "train": {"loss": "denoise", "lr": 1e-4, **train},
            "losses": {"gram": {"weight": 20.0}},
            "output": {"storage_path": str(tmp_path / "runs"), "run_name": "rfsr_demo"},
        }
    )


def changed(cfg: RFSRConfig, **sections: dict[str, object]) -> RFSRConfig:
    tree = cfg.to_dict()
    for section, values in sections.items():
        node = tree
        for part in section.split("."):
            node = node[part]
        node.update(values)
    return build_config(tree)


def write_checkpoint(cfg: RFSRConfig, step: int) -> Path:
    """A real checkpoint of a tiny model at `step` in the run folder of `cfg`."""
    model = build_model(cfg.model, cfg.data.scale)
    state = build_state(cfg, model, torch.device("cpu"))
    state.step = step
    folder = Path(cfg.output.storage_path) / cfg.output.run_name / f"checkpoint_{step:08d}"
    return save_checkpoint(folder, state, Progress(run_id="run-1"), cfg)


def test_an_unchanged_rerun_resumes_and_allowed_keys_may_change(tmp_path):
    cfg = config(tmp_path)
    folder = write_checkpoint(cfg, 40)
    assert read_progress(folder).config_hash == config_hash(cfg)
    rerun = changed(
        cfg,
        train={"steps": 30000, "num_workers": 4, "validate_every": 7, "use_gpu": True},
        tracking={"uri": "sqlite:////elsewhere/mlflow.db", "experiment": "other"},
        data={"num_cpus": 2.0},
        eval={"output": "/tmp/elsewhere"},
    )
    assert config_hash(rerun) == config_hash(cfg)
    resume = find_resume(rerun)
    assert resume is not None and resume.folder == folder and resume.progress.step == 40
    assert resume.changes == {}


def test_a_changed_config_is_refused_naming_the_keys_and_both_fixes(tmp_path):
    cfg = config(tmp_path)
    write_checkpoint(cfg, 40)
    rerun = changed(cfg, train={"lr": 2e-4}, **{"losses.gram": {"weight": 5.0}})
    with pytest.raises(ConfigError) as error:
        find_resume(rerun)
    message = str(error.value)
    assert "output.run_name='rfsr_demo' already has a checkpoint at step 40" in message
    assert "train.lr: 0.0001 → 0.0002" in message
    assert "losses.gram.weight: 20.0 → 5.0" in message
    assert "pick a new output.run_name" in message and "--resume" in message


def test_resume_flag_continues_with_the_changes_listed(tmp_path):
    cfg = config(tmp_path)
    write_checkpoint(cfg, 40)
    parser = build_parser("finetune", resumable=True)
    overrides = [f"{k}={v}" for k, v in _flat_overrides(cfg).items()] + ["train.lr=2e-4"]
    rerun = parse_config(parser, ["--resume", *overrides])
    assert rerun.output.allow_config_change
    resume = find_resume(rerun)
    assert resume is not None and resume.changes == {"train.lr": (1e-4, 2e-4)}
    assert parse_config(parser, overrides).output.allow_config_change is False


def test_pipelines_that_train_no_run_have_no_resume_flag():
    with pytest.raises(SystemExit):
        build_parser("upscale").parse_args(["--resume"])


def test_a_checkpoint_without_a_hash_is_compared_by_its_config_yaml(tmp_path):
    """Checkpoints written before the hash existed: progress.json without `config_hash`, the
    marker's old text, and a config.yaml that lacks keys added since (they read as their
    defaults, which keep the earlier behaviour)."""
    cfg = config(tmp_path)
    folder = write_checkpoint(cfg, 20)
    progress = json.loads((folder / "progress.json").read_text())
    del progress["config_hash"]
    (folder / "progress.json").write_text(json.dumps(progress))
    (folder / COMPLETE_MARKER).write_text("ok\n")
    tree = cfg.to_dict()
    del tree["train"]["ema_schedule"]  # a key this checkpoint's code did not have yet
    (folder / "config.yaml").write_text(yaml.safe_dump(tree))
    assert find_resume(cfg).changes == {}
    with pytest.raises(ConfigError, match=r"train\.grad_accum: 2 → 4"):
        find_resume(changed(cfg, train={"grad_accum": 4}))


def test_a_checkpoint_still_being_copied_is_not_complete(tmp_path):
    """Ray copies a checkpoint to storage file by file in parallel: the marker may arrive
    before the weights, so completeness is judged by the sizes the marker lists."""
    cfg = config(tmp_path)
    older = write_checkpoint(cfg, 20)
    newer = write_checkpoint(cfg, 40)
    assert is_complete(newer) and latest_checkpoint(newer.parent)[0] == newer
    weights = newer / "optimizer.pt"
    weights.write_bytes(weights.read_bytes()[:10])  # cut short mid-copy
    assert not is_complete(newer) and read_progress(newer) is None
    assert latest_checkpoint(newer.parent)[0] == older
    marker = older / COMPLETE_MARKER
    marker.write_text(marker.read_text()[:20])  # the marker itself only partly copied
    assert not is_complete(older) and latest_checkpoint(older.parent) is None


def _flat_overrides(cfg: RFSRConfig) -> dict[str, object]:
    """The overrides that rebuild `cfg`'s non-default keys used here."""
    return {
        "model.tiny.block_out_channels": "[8,16]",
        "model.tiny.norm_num_groups": 4,
        "train.loss": "denoise",
        "train.lr": 1e-4,
        "losses.gram.weight": 20.0,
        "output.storage_path": cfg.output.storage_path,
        "output.run_name": cfg.output.run_name,
    }


def test_rescaling_workers_on_resume_is_allowed_with_a_warning(tmp_path, caplog):
    from rfsr_ray.train.driver import _warn_if_rescaled

    cfg = config(tmp_path, num_workers=2, batch_size=1, grad_accum=2)
    write_checkpoint(cfg, 40)
    resume = find_resume(changed(cfg, train={"num_workers": 4}))
    assert resume is not None and resume.changes == {}
    with caplog.at_level("WARNING", logger="rfsr_ray.train"):
        _warn_if_rescaled(changed(cfg, train={"num_workers": 4}), resume)
    assert "train.num_workers changed 2 → 4" in caplog.text and "from 4 to 8 samples" in caplog.text
