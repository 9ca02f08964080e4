"""The DAPE tagger stage of a seesr fine-tune: what an actor adds to a batch of pairs, and the
placement check that refuses plans where training and tagging wait on each other for GPUs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rfsr_ray.config import build_config
from rfsr_ray.errors import ConfigError
from rfsr_ray.images import to_tensor
from rfsr_ray.models import build_model
from rfsr_ray.testing.tiny_components import TINY_TAGGER, save_tiny_components
from rfsr_ray.train.step import Batch
from rfsr_ray.train.tagging import TaggerStage, check_placement, demands

EIGHT_GPUS = [{"CPU": 96, "GPU": 8}]


def seesr_tree(folder: Path | str, **tagging: object) -> dict:
    files = {key: str(Path(folder) / name) for key, name in TINY_TAGGER.items()}
    seesr = {"tagger_size": "tiny", **files, "tagging": tagging}
    return {"model": {"family": "seesr", "pretrained": str(folder), "seesr": seesr}}


def gpu_plan(gpus_per_worker: float, **tagging: object):
    tree = seesr_tree("/weights/seesr", **tagging)
    tree["train"] = {
        "num_workers": 8,
        "use_gpu": True,
        "gpus_per_worker": gpus_per_worker,
        "cpus_per_worker": 8,
    }
    return build_config(tree)


@pytest.fixture(scope="module")
def seesr_folder(tmp_path_factory) -> Path:
    return save_tiny_components("seesr", tmp_path_factory.mktemp("seesr") / "seesr")


def test_stage_adds_the_tags_and_embeddings_the_model_would_make(seesr_folder):
    cfg = build_config(seesr_tree(seesr_folder))
    rng = np.random.default_rng(0)
    batch = {"lr": rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8), "epoch": np.zeros(3)}
    out = TaggerStage(cfg.model.seesr, use_gpu=False)(dict(batch))  # no stats actor: no Ray
    assert out["caption"].shape == (3,) and out["image_embeds"].dtype == np.float32
    model = build_model(cfg.model, 4)
    captions, embeds = model.tag(to_tensor(batch["lr"]))
    assert list(out["caption"]) == captions  # validation and upscale.py tag the same way
    assert np.array_equal(out["image_embeds"], embeds.numpy())
    # and the training batch hands them to the model instead of tagging again
    training = Batch(to_tensor(batch["lr"]), torch.zeros(3, 3, 32, 32), captions, embeds)
    condition = training.condition(model, None)
    assert torch.equal(condition.image_embeds, embeds)


def test_recipe_plan_shares_each_gpu_between_a_worker_and_a_tagger():
    cfg = gpu_plan(0.9, num_actors=8, gpus_per_actor=0.1)
    check_placement(cfg, EIGHT_GPUS)
    check_placement(cfg, [{"CPU": 48, "GPU": 4}] * 2)  # two nodes of four GPUs
    # tagger actors on CPU beside whole-GPU workers fit too
    check_placement(gpu_plan(1.0, num_actors=4, gpus_per_actor=0), EIGHT_GPUS)


def test_workers_on_every_whole_gpu_leave_none_for_gpu_taggers():
    advice = r"no GPU room for tagger actor 1 of 1.*gpus_per_actor: 0\.1"
    with pytest.raises(ConfigError, match=advice):
        check_placement(gpu_plan(1.0, num_actors=1, gpus_per_actor=0.1), EIGHT_GPUS)
    # nine 0.1-GPU actors beside eight 0.9-GPU workers: the ninth has no GPU with room
    with pytest.raises(ConfigError, match="tagger actor 9 of 9"):
        check_placement(gpu_plan(0.9, num_actors=9, gpus_per_actor=0.1), EIGHT_GPUS)


def test_cpus_are_checked_per_node():
    cfg = gpu_plan(0.9, num_actors=8, gpus_per_actor=0.1)
    # 8 workers × 8 CPUs fill a 64-CPU node: the tagger actors' CPUs are missing
    with pytest.raises(ConfigError, match=r"64 CPUs.*no CPU room for tagger actor 1 of 8"):
        check_placement(cfg, [{"CPU": 64, "GPU": 8}])


def test_local_mode_holds_no_worker_resources():
    cfg = build_config(seesr_tree("/weights/seesr") | {"train": {"num_workers": 0}})
    assert [d.what for d in demands(cfg)] == ["tagger actor", "degradation task"]
    check_placement(cfg, [{"CPU": 2}])


def test_prompts_from_data_are_refused_for_seesr():
    tree = seesr_tree("/weights/seesr")
    tree["model"]["prompt"] = {"from_data": True}
    with pytest.raises(ConfigError, match="DAPE tagger's tags"):
        build_config(tree)


def test_gpu_taggers_on_a_cluster_without_gpus_are_told_to_tag_on_cpu():
    cfg = build_config(seesr_tree("/weights/seesr", gpus_per_actor=0.1))
    with pytest.raises(ConfigError, match=r"no GPU: tag on CPU"):
        check_placement(cfg, [{"CPU": 4}])
