"""Evaluation building blocks without a Ray cluster: tiling, colour fixes, test-set matching,
metric resolution and the aggregate table."""

from __future__ import annotations

import itertools
import math
import urllib.error

import numpy as np
import pyiqa
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rfsr_ray.config import TestSetConfig as SetConfig  # not a pytest class
from rfsr_ray.errors import ConfigError
from rfsr_ray.eval.inference import (
    _wavelet_split,
    adain_color_fix,
    super_resolve,
    tile_starts,
    tiled_super_resolve,
    wavelet_color_fix,
)
from rfsr_ray.eval.metrics import MetricInfo, resolve_metrics
from rfsr_ray.eval.report import aggregate, markdown
from rfsr_ray.eval.testsets import UNPAIRED, _entries, _load_folder_rows
from tests.conftest import natural_image


class BilinearModel:
    """Stand-in ISR model: bilinear ×2 upsampling, deterministic and local."""

    scale = 2

    def sample(self, lr, steps, generator, reference=False):
        return F.interpolate(lr, scale_factor=2, mode="bilinear", align_corners=False)


@pytest.mark.parametrize(("length", "tile", "overlap"), [(10, 16, 4), (40, 16, 4), (33, 8, 2)])
def test_tiles_cover_the_image_with_the_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and min(length, starts[-1] + tile) == length
    covered = np.zeros(length, bool)
    for start in starts:
        covered[start : start + tile] = True
    assert covered.all()
    assert all(b - a <= tile - overlap for a, b in itertools.pairwise(starts))


def test_tiled_output_matches_the_whole_image_away_from_tile_borders():
    image = natural_image(40, 56)
    model = BilinearModel()
    whole = super_resolve(model, image, 1, 0).astype(int)
    tiled = tiled_super_resolve(model, image, 1, 0, tile=16, overlap=4).astype(int)
    assert tiled.shape == whole.shape == (80, 112, 3)
    # Bilinear is local: blended tiles agree with the whole image except a pixel at tile edges.
    assert np.mean(np.abs(tiled - whole)) < 1.0 and np.percentile(np.abs(tiled - whole), 99) <= 8
    small = natural_image(12, 12)
    assert np.array_equal(
        tiled_super_resolve(model, small, 1, 0, 16, 4), super_resolve(model, small, 1, 0)
    )


def test_colour_fixes_take_colour_from_the_reference():
    torch.manual_seed(0)
    reference = torch.rand(1, 3, 64, 64) * 0.5 + 0.25
    sr = (reference * 0.6 + 0.3).clamp(0, 1)  # shifted colours, same structure
    fixed = adain_color_fix(sr, reference)
    assert torch.allclose(fixed.mean((-2, -1)), reference.mean((-2, -1)), atol=1e-3)
    wavelet = wavelet_color_fix(sr, reference)
    _, low_fixed = _wavelet_split(wavelet)
    _, low_reference = _wavelet_split(reference)
    _, low_sr = _wavelet_split(sr)
    assert (low_fixed - low_reference).abs().mean() < 0.25 * (low_sr - low_reference).abs().mean()


def test_paired_folders_match_realsr_and_div2k_names_and_keep_unpaired(tmp_path):
    lr, hr = tmp_path / "LR", tmp_path / "HR"
    lr.mkdir(), hr.mkdir()
    for name in ("Canon_001_LR4.png", "0801x4.png", "orphan_LR4.png"):
        Image.fromarray(natural_image(8, 8)).save(lr / name)
    for name in ("Canon_001_HR.png", "0801.png"):
        Image.fromarray(natural_image(32, 32)).save(hr / name)
    entries = _entries(SetConfig(name="t", kind="paired", lr=str(lr), hr=str(hr)))
    assert [e["image_id"] for e in entries] == ["0801", "Canon_001", "orphan"]
    batch = {key: np.asarray([e[key] for e in entries], dtype=object) for key in entries[0]}
    rows = _load_folder_rows(batch)
    assert list(rows["skip"]) == ["", "", UNPAIRED]
    assert all(len(data) > 0 for data in rows["hr_png"][:2])


def test_unknown_metric_is_a_config_error_and_missing_weights_skip(monkeypatch):
    with pytest.raises(ConfigError, match="not pyiqa metrics"):
        resolve_metrics(("psnr", "no_such_metric"))
    real_create = pyiqa.create_metric

    def offline(name, *args, **kwargs):
        if name == "lpips":
            raise urllib.error.URLError("Name or service not known")
        return real_create(name, *args, **kwargs)

    monkeypatch.setattr(pyiqa, "create_metric", offline)
    usable, skipped = resolve_metrics(("psnr", "lpips", "piqe"))
    assert [(m.name, m.full_reference, m.lower_better) for m in usable] == [
        ("psnr", True, False),
        ("piqe", False, True),
    ]
    assert "weights not available offline" in skipped["lpips"]


def test_aggregate_table_marks_best_by_direction_and_drops_fr_on_lr_only():
    infos = [MetricInfo("psnr", True, False), MetricInfo("piqe", False, True)]
    rows = [
        {"set": "paired", "model": "base", "psnr": 20.0, "piqe": 40.0},
        {"set": "paired", "model": "tuned", "psnr": 21.0, "piqe": 50.0},
        {"set": "wild", "model": "base", "psnr": math.nan, "piqe": 30.0},
        {"set": "wild", "model": "tuned", "psnr": math.nan, "piqe": 20.0},
    ]
    table = aggregate(rows, infos)
    assert table["wild"]["tuned"] == {"piqe": 20.0}
    text = markdown(table, infos, "base", {"paired": {"evaluated": 1}, "wild": {"evaluated": 1}})
    paired, wild = text.split("### wild")
    assert "| base | 20.0000 | **40.0000** |" in paired  # piqe: lower is better
    assert "| tuned | **21.0000** | 50.0000 |" in paired
    assert "| Δ tuned − base | +1.0000 | +10.0000 |" in paired
    assert "psnr" not in wild and "| tuned | **20.0000** |" in wild
