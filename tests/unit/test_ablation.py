"""Ablation studies without Ray: the default variants, the study config's checks, variants and
seeds applied to trial configs, and the paired statistics of the table."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from scipy import stats

from rfsr_ray.config import build_config, load_config
from rfsr_ray.errors import ConfigError
from rfsr_ray.tune.ablation import (
    default_variants,
    markdown,
    paired_difference,
    summarise,
    with_default_study,
)
from rfsr_ray.tune.results import TrialRow
from rfsr_ray.tune.space import param_space, trial_config, validate_sweep

ROOT = Path(__file__).resolve().parents[2]


def demo():
    return load_config(ROOT / "configs" / "demo.yaml")


def test_default_variants_cover_the_papers_claims_and_the_shortcut():
    variants = default_variants(demo())
    assert list(variants) == [
        "rfsr", "no_split", "no_structure", "no_gram", "gram_kl", "one_step", "trajectory_buffer",
    ]  # fmt: skip
    study = with_default_study(demo())
    assert study.tune.space.seed.values == (0, 1, 2) and study.tune.scheduler.kind == "none"
    validate_sweep(study)  # every default variant is a valid fine-tune of the demo
    no_split = trial_config(study, {"variant": "no_split", "seed": 0}).loss_windows()
    assert no_split == {"structure": (0, 4), "reward": (0, 9), "gram": (0, 9)}
    one_step = trial_config(study, {"variant": "one_step", "seed": 0})
    assert one_step.schedule.mode == "one_step"
    assert not trial_config(study, {"variant": "no_gram", "seed": 0}).losses.gram.enabled


def test_a_variant_equal_to_the_base_is_left_out_and_the_split_shorthand_is_kept():
    tree = demo().to_dict()
    tree["schedule"].update(mode="one_step", split={"structure_end": 3, "reward_start": 6})
    tree["losses"]["gram"]["enabled"] = False
    variants = default_variants(build_config(tree))
    assert "one_step" not in variants and "no_gram" not in variants
    assert "gram_kl" not in variants  # a Gram variant of a run without Gram is the same run
    assert variants["no_split"] == {
        "schedule.split": None,
        "losses.structure.window": [0, 3],
        "losses.reward.window": [0, 9],
    }


def test_seed_sets_the_training_and_data_seeds_and_variants_apply_first():
    tree = demo().to_dict()
    tree["tune"] = {
        "variants": {"rfsr": {}, "seeded": {"train.seed": 99, "losses.gram.weight": 1.0}},
        "space": {"seed": {"grid": [4, 5]}},
    }
    cfg = build_config(tree)
    trial = trial_config(cfg, {"seed": 5, "variant": "seeded"})
    assert (trial.train.seed, trial.data.seed, trial.losses.gram.weight) == (5, 5, 1.0)
    space = param_space(cfg)
    assert space["variant"] == {"grid_search": ["rfsr", "seeded"]}
    assert space["seed"] == {"grid_search": [4, 5]}


@pytest.mark.parametrize(
    ("tune", "message"),
    [
        ({"variants": {"a": {}, "b": {"losses.gram.weight": -1}}}, "tune.variants.b"),
        ({"variants": {"a": {}, "b": {"losses.nope": 1}}}, "tune.variants.b"),
        ({"variants": {"a": {}}, "space": {"gram_weight": {"grid": [1.0]}}}, "move them into"),
        ({"variants": {"a": {}}, "scheduler": {"grace_period": 5}}, "tune.scheduler.kind=none"),
        ({"variants": {"a": {}}, "search": "random"}, "tune.search=grid"),
        ({"variants": {"a": {}}, "space": {"seed": {"randint": [0, 3]}}}, "lists its seeds"),
        ({"variants": {"a": {}}, "baseline_variant": "b"}, "tune.baseline_variant='b'"),
    ],
)
def test_a_study_that_cannot_run_is_refused_with_the_key_to_fix(tune, message):
    tree = demo().to_dict()
    tree["tune"] = tune
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        validate_sweep(with_default_study(build_config(tree)))


def test_paired_difference_is_the_mean_with_students_t_interval():
    differences = [0.3, 0.1, 0.2]
    paired = paired_difference(differences, 0.95)
    half = stats.t.ppf(0.975, 2) * stats.tstd(differences) / math.sqrt(3)
    assert paired.mean == pytest.approx(0.2)
    assert (paired.low, paired.high) == pytest.approx((0.2 - half, 0.2 + half))
    assert half == pytest.approx(0.2484, abs=1e-4) and not paired.significant  # holds 0
    assert paired_difference([0.30, 0.31, 0.29], 0.95).significant
    assert paired_difference([-0.30, -0.31, -0.29], 0.95).significant
    one = paired_difference([0.3, math.nan], 0.95)
    assert (one.n, one.mean) == (1, 0.3) and math.isnan(one.low) and not one.significant


def row(variant: str, seed: int, reward: float, psnr: float, error: str | None = None) -> TrialRow:
    final = {} if error else {"val_reward_gain": reward, "val_psnr_gain": psnr}
    return TrialRow(
        trial_id=f"{variant}{seed}", params={"variant": variant, "seed": seed},
        structure_end=4, reward_start=5, gram_weight=20.0, reward_gain=reward, psnr_change=psnr,
        gram_distance=math.nan, objective=reward, steps=10, asha_stopped=False, error=error,
        final=final,
    )  # fmt: skip


def test_the_table_pairs_by_seed_marks_only_intervals_without_zero_and_lists_failures():
    tree = demo().to_dict()
    tree["tune"] = {
        "variants": {"rfsr": {}, "worse": {}, "same": {}},
        "space": {"seed": {"grid": [0, 1, 2]}},
    }
    cfg = with_default_study(build_config(tree))
    rows = [row("rfsr", s, 0.01 * (s + 1), 0.1) for s in range(3)]
    rows += [row("worse", s, 0.01 * (s + 1) - 0.005 - 0.0001 * s, 0.1) for s in range(3)]
    rows += [row("same", 0, 0.02, 0.1), row("same", 1, 0.01, 0.1)]
    rows += [row("same", 2, 0, 0, error="RuntimeError: out of memory")]
    study = summarise(cfg, rows)
    worse = study.paired["worse"]["reward_gain"]
    assert worse.n == 3 and worse.mean == pytest.approx(-0.0051) and worse.significant
    same = study.paired["same"]["reward_gain"]
    assert same.n == 2 and not same.significant  # +0.01 and -0.01: the interval holds 0
    assert [r.trial_id for r in study.failed["same"]] == ["same2"]
    table = markdown(study)
    assert "**-0.0051 [" in table  # marked
    assert "| same | 2 |" in table and "same seed 2 (trial same2): RuntimeError" in table
    assert f"{study.comparisons} comparisons (2 variants × " in table
    # The baseline's own gains: reward 0.01, 0.02, 0.03 (positive on every seed, but the
    # interval of 3 holds 0); PSNR 0.1 on every seed (the interval excludes 0).
    gains = study.baseline_gains()
    reward, positive = gains["reward_gain"]
    assert (reward.n, positive) == (3, 3) and reward.mean == pytest.approx(0.02)
    assert not reward.significant and gains["psnr_gain_db"][0].significant
    assert "reward_gain 0.02 [-0.00484, 0.0448], > 0 on 3 of 3 seeds ·" in table
    assert "psnr_gain_db 0.1 [0.1, 0.1], > 0 on 3 of 3 seeds; **excludes 0**" in table
    assert "seconds_per_step" not in gains and "gram_to_base" not in gains
    assert study.comparisons == 2 * len(study.metrics)


def test_the_shipped_studies_are_valid_and_run_what_their_headers_say():
    tiny = with_default_study(load_config(ROOT / "configs" / "ablate" / "tiny.yaml"))
    validate_sweep(tiny)
    assert list(tiny.tune.variants) == ["rfsr", "no_split", "no_structure", "no_gram", "one_step"]
    assert tiny.tune.space.seed.values == (0, 1, 2)
    cluster = with_default_study(load_config(ROOT / "configs" / "ablate" / "gpu_cluster.yaml"))
    validate_sweep(cluster)
    assert len(cluster.tune.variants) == 7 and cluster.model.family == "sd_upscaler"
    assert (cluster.train.num_workers, cluster.train.gpus_per_worker) == (2, 1)
    assert cluster.tune.max_concurrent_trials * cluster.train.num_workers == 8
