from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import prepare_data
from rfsr_ray.config import build_config
from rfsr_ray.data.parquet import read_pair_dataset
from rfsr_ray.data.pipeline import build_pair_dataset
from rfsr_ray.errors import DataError
from tests.conftest import bad_image_files

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def small_config(**sections):
    tree = {"data": {"patch_size": 32, "crops_per_image": 2, "batch_size": 4}}
    for key, value in sections.items():
        tree.setdefault(key, {}).update(value)
    return build_config(tree)


def test_builtin_stream_has_documented_schema(ray_cluster):
    cfg = small_config(data={"sources": ["builtin:astronaut+coffee"]})
    pipeline = build_pair_dataset(cfg.data, cfg.degradation, epochs=(0, 1))
    rows = pipeline.dataset.take_all()
    assert len(rows) == 2 * 2 * 2  # images × crops × epochs
    row = rows[0]
    assert row["hr"].shape == (32, 32, 3) and row["hr"].dtype == np.uint8
    assert row["lr"].shape == (8, 8, 3) and row["lr"].dtype == np.uint8
    assert row["crop_box"].tolist()[2:] == [32, 32]
    assert "kernel1" in json.loads(row["degradation"])
    assert {r["epoch"] for r in rows} == {0, 1}
    assert pipeline.counts()["pairs"] == 8


def test_same_pairs_with_any_parallelism_counted_or_not(ray_cluster):
    def collect(batch_size, concurrency, count):
        cfg = small_config(
            data={
                "sources": ["builtin:astronaut+coffee+rocket"],
                "batch_size": batch_size,
                "concurrency": concurrency,
            }
        )
        pipeline = build_pair_dataset(cfg.data, cfg.degradation, count=count)
        rows = pipeline.dataset.take_all()
        return {(r["source_id"], r["crop_index"]): r["lr"].tobytes() for r in rows}, pipeline

    pairs, _ = collect(1, 3, count=True)
    uncounted, pipeline = collect(3, 1, count=False)  # how the validation set is made
    assert pairs == uncounted
    with pytest.raises(ValueError, match="count=False"):
        pipeline.counts()


def test_bad_inputs_are_skipped_and_counted(ray_cluster, tmp_path):
    expected = bad_image_files(tmp_path / "imgs" / "nested")
    cfg = small_config(data={"sources": [str(tmp_path / "imgs")], "crops_per_image": 1})
    pipeline = build_pair_dataset(cfg.data, cfg.degradation)
    rows = pipeline.dataset.take_all()
    counts = pipeline.counts()
    outcomes = [o for names in expected.values() for o in names]
    skipped = sum(o.startswith("skipped_") for o in outcomes)
    assert counts["decoded"] == len(expected) - skipped
    assert len(rows) == counts["pairs"] == len(expected) - skipped
    for outcome in set(outcomes) - {"decoded"}:
        assert counts[outcome] == outcomes.count(outcome), outcome
    assert {r["source_id"] for r in rows} >= {"nested/good.png", "nested/cmyk.jpg"}


def test_weights_scale_crops(ray_cluster):
    cfg = small_config(
        data={
            "sources": [
                {"kind": "builtin", "names": ["coffee"], "weight": 3},
                {"kind": "builtin", "names": ["rocket"]},
            ]
        }
    )
    rows = build_pair_dataset(cfg.data, cfg.degradation).dataset.take_all()
    per_source = {
        s: sum(r["source_id"] == s for r in rows) for s in ("builtin:coffee", "builtin:rocket")
    }
    assert per_source == {"builtin:coffee": 6, "builtin:rocket": 2}


def test_prepare_data_round_trip_and_parquet_source(ray_cluster, tmp_path):
    out = tmp_path / "pairs"
    argv = [
        "data.sources=[builtin:astronaut+chelsea]",
        "data.patch_size=32",
        "data.crops_per_image=2",
        f"prepare.dir={out}",
        "prepare.preview_rows=2",
    ]
    assert prepare_data.main(argv) == 0
    assert (out / "preview.png").is_file() and (out / "config.yaml").is_file()
    table = pq.read_table(out / "pairs")
    assert table.num_rows == 4 and {"hr_png", "lr_png", "degradation"} <= set(table.column_names)
    rows = read_pair_dataset(out).take_all()
    assert rows[0]["hr"].shape == (32, 32, 3) and rows[0]["lr"].shape == (8, 8, 3)
    assert prepare_data.main(argv) == 2  # refuses to overwrite
    assert prepare_data.main([*argv, "prepare.overwrite=true"]) == 0

    # The written set serves as an HR Parquet source too (hr_png column as image bytes).
    cfg = small_config(
        data={
            "sources": [{"kind": "parquet", "path": str(out / "pairs"), "image_column": "hr_png"}],
            "patch_size": 16,
        }
    )
    assert len(build_pair_dataset(cfg.data, cfg.degradation).dataset.take_all()) == 8


def test_all_inputs_skipped_fails_with_reasons(ray_cluster, tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"")
    (tmp_path / "imgs" / "b.jpg").write_text("nope")
    code = prepare_data.main(
        [
            f"data.sources=[{tmp_path / 'imgs'}]",
            "data.patch_size=32",
            f"prepare.dir={tmp_path / 'out'}",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "every input was skipped" in err and "empty_file=1" in err and "not_an_image=1" in err
    assert not (tmp_path / "out").exists()


def test_missing_folder_is_a_clear_error(ray_cluster, tmp_path):
    cfg = small_config(data={"sources": [str(tmp_path / "missing")]})
    with pytest.raises(DataError, match="cannot be read"):
        build_pair_dataset(cfg.data, cfg.degradation)


def test_captions_travel_with_their_pairs(ray_cluster, tmp_path):
    """Folder sidecars and a Parquet text column become each pair's `caption` ('' = none), and
    prepare_data's Parquet sets keep them."""
    import pyarrow as pa
    from PIL import Image

    from rfsr_ray.data.sources import builtin_image

    folder = tmp_path / "hr"
    folder.mkdir()
    Image.fromarray(builtin_image("coffee")).save(folder / "coffee.png")
    Image.fromarray(builtin_image("rocket")).save(folder / "rocket.png")
    (folder / "coffee.txt").write_text("a cup of coffee\n")
    table = pa.table(
        {"image": [(folder / "rocket.png").read_bytes()], "text": ["a rocket on the pad"]}
    )
    pq.write_table(table, tmp_path / "captions.parquet")
    sources = [
        {"kind": "folder", "path": str(folder), "caption_extension": ".txt"},
        {"kind": "parquet", "path": str(tmp_path / "captions.parquet"), "caption_column": "text"},
    ]
    cfg = small_config(data={"sources": sources, "crops_per_image": 1})
    rows = build_pair_dataset(cfg.data, cfg.degradation).dataset.take_all()
    by_source = {row["source_id"]: row["caption"] for row in rows}
    assert by_source["coffee.png"] == "a cup of coffee"
    assert by_source["rocket.png"] == ""  # no sidecar: the empty caption, not a lost image
    assert "a rocket on the pad" in by_source.values() and len(rows) == 3
    with pytest.raises(Exception, match="caption_column is for Parquet"):
        build_config(
            {"data": {"sources": [{"kind": "folder", "path": "x", "caption_column": "t"}]}}
        )


def test_val_seed_fixes_the_held_out_crops_across_seeds(ray_cluster):
    """Without data.val_seed each data.seed gets its own held-out crops; with it, every seed is
    validated on the same ones (an ablation compares seeds on one held-out set)."""
    from rfsr_ray.train.driver import build_validation_set

    def held_out(**data):
        base = {"sources": ["builtin:astronaut"], "val_source": "builtin:coffee", "val_size": 2}
        return build_validation_set(small_config(data={**base, **data})).hr

    seed0, seed1 = held_out(seed=0), held_out(seed=1)
    assert seed0.shape == (2, 32, 32, 3) and not np.array_equal(seed0, seed1)
    fixed0, fixed1 = held_out(seed=0, val_seed=5), held_out(seed=1, val_seed=5)
    assert np.array_equal(fixed0, fixed1) and not np.array_equal(fixed0, seed0)
    assert np.array_equal(held_out(seed=3, val_seed=0), seed0)  # val_seed s = data.seed s
