"""The validation grid a person reads (enlarged panels, labels, per-row captions, full-resolution
centre crops of large images) and the bicubic | base | fine-tuned table."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rfsr_ray.eval.report import comparison_grid
from rfsr_ray.images import labelled_grid, to_tensor, upscale_nearest
from rfsr_ray.iqa import create_metric
from rfsr_ray.losses.rfsr import RFSRLosses
from rfsr_ray.models import build_model
from rfsr_ray.train import validate
from rfsr_ray.train.validate import (
    GRID_COLUMNS,
    ValidationSet,
    Validator,
    grid_panels,
    row_caption,
)
from tests.unit.helpers import tiny_config

CPU = torch.device("cpu")
WHITE = 255


def _noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _find(grid: np.ndarray, panel: np.ndarray) -> list[tuple[int, int]]:
    """Every (top, left) where `panel` appears pixel for pixel in `grid`."""
    height, width = panel.shape[:2]
    candidates = np.argwhere((grid == panel[0, 0]).all(axis=-1))
    return [
        (int(top), int(left))
        for top, left in candidates
        if np.array_equal(grid[top : top + height, left : left + width], panel)
    ]


def _validation_set(count: int, hr_size: int, seed: int = 0) -> ValidationSet:
    """Noise HR images (every panel unique in a grid) and their x4 area-downsampled LR."""
    hr = _noise((count, hr_size, hr_size, 3), seed)
    lr = F.interpolate(to_tensor(hr), scale_factor=0.25, mode="area")
    return ValidationSet(lr=lr.mul(255).round().byte().permute(0, 2, 3, 1).numpy(), hr=hr)


def _tiny_cfg():
    return tiny_config(losses={"gram": {"enabled": False}})  # its VGG19 would dominate the time


class _Upscaler:
    """A stand-in sampler for large images, where the tiny UNet is slow on a CPU: bicubic
    upsampling, darkened for the base so that base and fine-tuned differ."""

    def sample(self, lr_image, num_inference_steps, generator, reference=False):
        size = (lr_image.shape[-2] * 4, lr_image.shape[-1] * 4)
        up = F.interpolate(lr_image, size=size, mode="bicubic", align_corners=False)
        return up.clamp(0, 1) * (0.8 if reference else 1.0)


# ------------------------------------------------------------------ drawing helpers
def test_upscale_nearest_repeats_pixels_by_the_smallest_integer_factor():
    panel = _noise((32, 32, 3))
    shown = upscale_nearest(panel, 128)
    assert shown.shape == (128, 128, 3)
    blocks = shown.reshape(32, 4, 32, 4, 3)
    assert (blocks == panel[:, None, :, None]).all()  # every 4 × 4 block is one source pixel
    assert upscale_nearest(_noise((48, 40, 3)), 128).shape == (144, 120, 3)  # ceil(128/48) = 3
    large = _noise((200, 200, 3))
    assert np.array_equal(upscale_nearest(large, 128), large)


def test_labelled_grid_enlarges_panels_and_draws_header_and_captions():
    rows = [[_noise((32, 32, 3), seed=4 * row + col) for col in range(4)] for row in range(4)]
    captions = [f"PSNR {20 + row}.00 → {21 + row}.00 dB" for row in range(4)]
    grid = labelled_grid(rows, GRID_COLUMNS, captions)
    plain = labelled_grid(rows, GRID_COLUMNS)

    tops = []
    for row in rows:
        places = [_find(grid, upscale_nearest(panel, 128)) for panel in row]
        assert all(len(found) == 1 for found in places)  # each panel, enlarged 4x, exactly once
        assert len({found[0][0] for found in places}) == 1  # a row shares one top edge
        tops.append(places[0][0][0])
    assert (grid[: tops[0]] < 128).any()  # dark text above the panels: the column labels
    for above, below in pairwise(tops):
        assert (grid[above + 128 : below] < 128).any()  # a caption under every row ...
    assert (grid[tops[-1] + 128 :] < 128).any()  # ... the last one included
    plain_tops = [_find(plain, upscale_nearest(row[0], 128))[0][0] for row in rows]
    for above, below in pairwise(plain_tops):
        assert (plain[above + 128 : below] == WHITE).all()  # without captions: only a gutter


def test_labelled_grid_refuses_rows_that_do_not_match_the_labels():
    with pytest.raises(ValueError, match="one panel per column label"):
        labelled_grid([[_noise((8, 8, 3))] * 3], GRID_COLUMNS)
    with pytest.raises(ValueError, match="row captions"):
        labelled_grid([[_noise((8, 8, 3))] * 4], GRID_COLUMNS, ["a", "b"])


def test_grid_panels_crop_large_images_at_full_resolution_and_keep_small_ones_whole():
    columns = [_noise((2, 512, 512, 3), seed=col) for col in range(4)]
    rows, title = grid_panels(columns)
    assert len(rows) == 2 and all(len(row) == 4 for row in rows)
    assert np.array_equal(rows[1][3], columns[3][1, 128:384, 128:384])
    assert "centre 256x256 crops of 512x512 px, full resolution" in title
    small = [_noise((3, 32, 32, 3), seed=col) for col in range(4)]
    rows, title = grid_panels(small)
    assert np.array_equal(rows[2][0], small[0][2])
    assert "whole 32x32" in title and "enlarged" in title


# ------------------------------------------------------------------ the Validator
@pytest.fixture(scope="module")
def validated():
    """A tiny model whose weights moved away from its frozen copy (the base), validated on four
    32² noise images with the gmsd reward and the default held-out metric."""
    cfg = _tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.scale)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    val_set = _validation_set(4, 32)
    validator = Validator(cfg, val_set, RFSRLosses(cfg, CPU), CPU)
    base = validator.base(model)
    current, grid = validator.run(model)
    return validator, val_set, base, current, grid


def test_with_the_gram_regulariser_off_validation_still_measures_the_gram_distance():
    """An ablation's no_gram variant (`losses.monitor.gram_to_base`, which every study sets):
    the losses hold no Gram term, and validation reports the distance to the base model's Gram
    matrices through the VGG19 the regulariser would use: 0 for the base, > 0 once the weights
    moved. Without the key it reports none."""
    cfg = tiny_config(losses={"gram": {"enabled": False}, "monitor": {"gram_to_base": True}})
    losses = RFSRLosses(cfg, CPU)
    assert losses.gram is None
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.scale)
    validator = Validator(cfg, _validation_set(2, 32), losses, CPU)
    assert validator.base(model)["gram_to_base"] == 0.0
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    current, _ = validator.run(model)
    assert 0.0 < current["gram_to_base"] < float("inf")
    quiet = Validator(_tiny_cfg(), _validation_set(2, 32), RFSRLosses(_tiny_cfg(), CPU), CPU)
    assert "gram_to_base" not in quiet.base(model)


def test_per_sample_scores_average_to_the_reported_metrics(validated):
    validator, _, base, current, _ = validated
    assert set(validator.last_scores) == set(current) == {"psnr", "ssim", "piqe", "reward_gmsd"}
    for scores, means in ((validator.base_scores, base), (validator.last_scores, current)):
        for name, values in scores.items():
            assert values.shape == (4,)
            assert float(values.mean()) == pytest.approx(means[name], rel=1e-9)
    assert not np.allclose(validator.base_scores["psnr"], validator.last_scores["psnr"])


def test_bicubic_baseline_is_the_metrics_of_the_interpolated_lr(validated):
    validator, val_set, _, _, _ = validated
    lr, hr = to_tensor(val_set.lr), to_tensor(val_set.hr)
    upscaled = F.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False)
    psnr = float(create_metric("psnr")(upscaled.clamp(0, 1), hr).mean())
    assert validator.bicubic_metrics["psnr"] == pytest.approx(psnr, rel=1e-6)
    assert set(validator.bicubic_metrics) == {"psnr", "ssim", "piqe", "reward_gmsd"}
    assert validator.bicubic_metrics["psnr"] > validator.base_metrics["psnr"]  # noise model


def test_final_rows_and_table_put_bicubic_beside_base_and_fine_tuned(validated):
    validator, _, base, current, _ = validated
    rows = validator.final_rows()
    assert list(rows) == ["metric", "bicubic", "base", "fine-tuned", "delta"]
    assert rows["metric"] == ["psnr ↑", "ssim ↑", "piqe ↓", "reward_gmsd ↑"]
    psnr = rows["metric"].index("psnr ↑")
    assert rows["bicubic"][psnr] == validator.bicubic_metrics["psnr"]
    assert rows["base"][psnr] == base["psnr"] and rows["fine-tuned"][psnr] == current["psnr"]
    assert rows["delta"][psnr] == pytest.approx(current["psnr"] - base["psnr"])
    table = validator.final_table()
    assert table.splitlines()[0] == (
        "| metric | bicubic | base | fine-tuned | Δ (fine-tuned − base) |"
    )
    bicubic = validator.bicubic_metrics["psnr"]
    delta = current["psnr"] - base["psnr"]
    expected = (
        f"| psnr ↑ | {bicubic:.4f} | {base['psnr']:.4f} | {current['psnr']:.4f} | {delta:+.4f} |"
    )
    assert expected in table


def test_validation_grid_is_labelled_enlarged_and_captioned_per_sample(validated):
    validator, val_set, _, _, grid = validated
    for index in range(4):
        assert len(_find(grid, upscale_nearest(val_set.hr[index], 128))) == 1
    caption = row_caption(validator.base_scores, validator.last_scores, 2, "reward_gmsd")
    base, tuned = validator.base_scores, validator.last_scores
    assert f"PSNR {base['psnr'][2]:.2f} → {tuned['psnr'][2]:.2f} dB" in caption
    assert f"gmsd {base['reward_gmsd'][2]:.4f} → {tuned['reward_gmsd'][2]:.4f}" in caption
    assert row_caption(base, tuned, 0, None) == f"PSNR {base['psnr'][0]:.2f} → " + (
        f"{tuned['psnr'][0]:.2f} dB"
    )
    first_top = _find(grid, upscale_nearest(val_set.hr[0], 128))[0][0]
    assert (grid[:first_top] < 128).any()  # title and column labels above the panels


def test_validation_grid_of_512px_images_shows_centre_crops_at_full_resolution(monkeypatch):
    # pyiqa's SSIM takes over a second per 512² image on a CPU; this test is about the grid
    monkeypatch.setattr(
        validate, "create_metric", lambda name, device: create_metric(name.replace("ssim", "psnr"))
    )
    cfg = _tiny_cfg()
    val_set = _validation_set(1, 512)
    validator = Validator(cfg, val_set, None, CPU)
    validator.base(_Upscaler())
    current, grid = validator.run(_Upscaler())
    hr_centre = val_set.hr[0, 128:384, 128:384]
    assert len(_find(grid, hr_centre)) == 1  # the HR's central 256², pixel for pixel
    assert grid.shape[1] < 4 * 512  # crops, not whole images side by side
    assert set(current) == {"psnr", "ssim", "piqe"}  # no reward configured: PSNR-only captions


def test_evaluation_comparison_grid_labels_columns_and_skips_incomplete_rows():
    crop = _noise((64, 64, 3), seed=9)
    png = b"crop"  # what the report stores; `decode` turns it into the array
    complete = {"image_id": "a", "lr_up": png, "hr": png, "sr": {"base": png, "tuned": png}}
    partial = {"image_id": "b", "lr_up": png, "hr": png, "sr": {"base": png}}
    grid = comparison_grid({"coffee": [complete, partial]}, ["base", "tuned"], {png: crop}.get)
    assert grid is not None
    assert len(_find(grid, upscale_nearest(crop, 128))) == 4  # one row of four panels
    top = _find(grid, upscale_nearest(crop, 128))[0][0]
    assert (grid[:top] < 128).any() and (grid[top + 128 :] < 128).any()  # labels, caption
