"""A fine-tune of each tiny latent family through `pipelines/finetune.py`: captions from a
Parquet source, Ray Data pairs, the RFSR loop, validation, the export and MLflow. Train's local
mode runs the loop in this process (a 2-worker group costs ~40 s of start-up on 2 cores); how
each family trains under DDP is tested with two forked gloo ranks in
tests/unit/test_family_ddp.py, the Ray Train worker group in test_demo_run.py,
test_worker_failure.py and test_started_cluster.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines import finetune
from rfsr_ray.models import load_model
from rfsr_ray.testing.tiny_components import save_tiny_components
from tests.integration.conftest import only_run, tiny_args

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def captioned(tmp_path: Path) -> Path:
    """A Parquet HR source with a caption per image."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from rfsr_ray.data.sources import builtin_image

    images = []
    for name in ("astronaut", "rocket"):
        buffer = io.BytesIO()
        Image.fromarray(builtin_image(name)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    path = tmp_path / "captioned.parquet"
    pq.write_table(pa.table({"image": images, "text": ["an astronaut", ""]}), path)
    return path


@pytest.mark.parametrize(
    ("family", "extra"),
    [
        # Full UNet fine-tune with gradient checkpointing.
        ("sd_upscaler", {"model.memory.gradient_checkpointing": "true"}),
        # LoRA on both the ControlNet and the UNet, SeeSR's LR-latent start, a fixed prompt.
        (
            "controlnet_sr",
            {
                "model.finetune": "lora",
                "model.lora.enabled": "true",
                "model.lora.apply_to": "[unet, controlnet]",
                "model.controlnet_sr.start": "lr_latent",
                "model.prompt.text": "a sharp photo",
                "model.prompt.drop_prob": 0.5,
                "model.prompt.from_data": "true",  # captions from the Parquet source below
            },
        ),
    ],
)
def test_finetune_of_a_latent_family(ray_cluster, tmp_path, family, extra):
    components = save_tiny_components(family, tmp_path / family)
    if "model.prompt.from_data" in extra:
        extra = {**extra, "data.sources": f"[{{kind: parquet, path: {captioned(tmp_path)}, "
                 "caption_column: text}]"}  # fmt: skip
    # Two steps: validation at steps 0 and 2, a checkpoint at 2.
    args = tiny_args(
        tmp_path,
        components,
        train__steps=2,
        train__num_workers=0,
        **{"model.family": family, **extra},
    )
    assert finetune.main(args) == 0
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.family"] == family
    history = client.get_metric_history(run.info.run_id, "loss")
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(m.value)) for m in history)
    assert "val_psnr" in run.data.metrics and "val_gram_to_base" in run.data.metrics
    export = Path(tmp_path / "runs" / "run" / "model")
    info = json.loads((export / "rfsr_model.json").read_text())
    assert info["family"] == family
    assert info["format"] == ("lora" if "model.finetune" in extra else "full")
    model = load_model(export)
    lr = torch.rand(1, 3, 8, 8)
    sr = model.sample(lr, 4, torch.Generator().manual_seed(0))
    assert sr.shape == (1, 3, 32, 32) and torch.isfinite(sr).all()
