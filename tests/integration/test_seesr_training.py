"""A fine-tune of a tiny SeeSR model through finetune.py, with the tags and image embeddings of
every training pair made by the Ray Data DAPE tagger stage (its actor pool). Train's local mode
runs the loop in this process; SeeSR's trained modules under DDP: tests/unit/test_family_ddp.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines import finetune
from rfsr_ray.models import load_model
from rfsr_ray.testing.tiny_components import TINY_TAGGER, save_tiny_components
from tests.integration.conftest import only_run, tiny_args

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_seesr_finetune_tags_in_the_data_stage(ray_cluster, tmp_path, caplog):
    folder = save_tiny_components("seesr", tmp_path / "seesr")
    seesr = {f"model.seesr.{key}": str(folder / name) for key, name in TINY_TAGGER.items()}
    extra = {
        "model.family": "seesr",
        "model.seesr.tagger_size": "tiny",
        "model.seesr.tagging.batch_size": 4,
        "train.steps": 2,
        "train.num_workers": 0,
        **seesr,
    }
    assert finetune.main(tiny_args(tmp_path, folder, **extra)) == 0
    # 2 steps × batch 2 = 4 pairs trained on; the stage tags what streams past
    tagged = [line for line in caplog.text.splitlines() if "pairs tagged by DAPE:" in line]
    assert tagged and int(tagged[-1].split(":")[-1]) >= 4, caplog.text[-3000:]
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.finetune"] in ("None", "controlnet+unet_image_attention")
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 2
    assert "val_psnr" in run.data.metrics and "val_gram_to_base" in run.data.metrics
    export = tmp_path / "runs" / "run" / "model"
    info = json.loads((export / "rfsr_model.json").read_text())
    assert info["family"] == "seesr"
    assert {"unet", "controlnet", "vae"} <= {p.name for p in Path(export).iterdir()}
    model = load_model(export)  # tags its LR input with the tagger the run trained with
    sr = model.sample(torch.rand(1, 3, 8, 8), 4, torch.Generator().manual_seed(0))
    assert sr.shape == (1, 3, 32, 32) and torch.isfinite(sr).all()
