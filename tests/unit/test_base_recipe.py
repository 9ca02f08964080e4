"""A cached base model made from another version of its pretraining recipe is flagged."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from rfsr_ray.config import load_config
from rfsr_ray.train.driver import RECIPE_RECORD, _recipe_digest, ensure_base_model

ROOT = Path(__file__).resolve().parents[2]


def demo_config(tmp_path: Path):
    recipe = tmp_path / "pretrain.yaml"
    shutil.copy(ROOT / "configs/pretrain_tiny.yaml", recipe)
    base = tmp_path / "base"
    base.mkdir()
    overrides = [f"model.pretrained={base}", f"model.pretrain_config={recipe}"]
    return load_config(ROOT / "configs/demo.yaml", overrides), recipe, base


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_base_from_the_current_recipe_is_used_quietly(tmp_path, caplog):
    cfg, recipe, base = demo_config(tmp_path)
    (base / RECIPE_RECORD).write_text(_recipe_digest(str(recipe)) + "\n")
    with caplog.at_level(logging.WARNING, logger="rfsr_ray"):
        ensure_base_model(cfg)
    assert warnings(caplog) == []


def test_changed_or_unrecorded_recipe_warns_with_the_fix(tmp_path, caplog):
    cfg, recipe, base = demo_config(tmp_path)
    with caplog.at_level(logging.WARNING, logger="rfsr_ray"):
        ensure_base_model(cfg)  # a folder with no record: made before records, or by hand
    (base / RECIPE_RECORD).write_text(_recipe_digest(str(recipe)) + "\n")
    recipe.write_text(recipe.read_text().replace("steps: 500", "steps: 400"))
    with caplog.at_level(logging.WARNING, logger="rfsr_ray"):
        ensure_base_model(cfg)  # the recipe changed since
    messages = warnings(caplog)
    assert len(messages) == 2
    assert all(str(base) in m and "Delete the folder" in m for m in messages)
