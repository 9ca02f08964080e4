"""Sweep spaces, trial configs, the objective and the results table (no Ray cluster)."""

from __future__ import annotations

import math

import pytest

from rfsr_ray.config import build_config, load_config
from rfsr_ray.errors import ConfigError
from rfsr_ray.train.objective import objective_parts
from rfsr_ray.tune.results import TrialRow, best_row, markdown_table, pareto_front
from rfsr_ray.tune.space import param_space, trial_config, validate_sweep

BASE = {
    "data": {"val_source": "builtin:coffee"},
    "schedule": {"num_inference_steps": 20},
    "losses": {
        "structure": {"window": [0, 7]},
        "reward": {"window": [16, 19], "terms": [{"name": "gmsd"}, {"name": "ssim"}]},
        "gram": {"window": [16, 19]},
    },
    "train": {"steps": 40, "validate_every": 10, "checkpoint_every": 20},
}


def sweep(space: dict, val_objective: dict | None = None, **tune: object) -> object:
    tree = {**BASE, "tune": {"space": space, **tune}}
    if val_objective is not None:
        tree["train"] = {**BASE["train"], "val_objective": val_objective}
    return build_config(tree)


def test_split_index_sets_both_windows_and_params_reach_the_config():
    cfg = sweep({"split_index": {"grid": [8]}})
    trial = trial_config(
        cfg, {"split_index": 8, "gram_weight": 3.0, "lr": 1e-5, "reward_weights.ssim": 0.2}
    )
    assert (trial.schedule.split.structure_end, trial.schedule.split.reward_start) == (7, 8)
    assert trial.losses.gram.weight == 3.0 and trial.train.lr == 1e-5
    assert [t.weight for t in trial.losses.reward.terms] == [5e-5, 0.2]
    assert cfg.losses.gram.weight == 5e-7  # the base config is never mutated


def test_structure_end_and_reward_start_set_the_split():
    cfg = sweep({"structure_end": {"grid": [5]}, "reward_start": {"randint": [10, 12]}})
    validate_sweep(
        cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"search": "random"})})
    )
    trial = trial_config(cfg, {"structure_end": 5, "reward_start": 11})
    assert (trial.schedule.split.structure_end, trial.schedule.split.reward_start) == (5, 11)


@pytest.mark.parametrize(
    ("space", "search", "message"),
    [
        ({}, "grid", "tune.space is empty"),
        ({"split_index": {"grid": [0, 8]}}, "grid", "tune.space.split_index=0"),
        ({"split_index": {"grid": [8, 20]}}, "grid", "split.reward_start=20 must be <"),
        (
            {"structure_end": {"randint": [5, 12]}, "reward_start": {"randint": [10, 15]}},
            "random",
            "structure_end=10, tune.space.reward_start=10",
        ),
        ({"gram_weight": {"grid": [1.0, -2.0]}}, "grid", "tune.space.gram_weight=-2.0"),
        ({"lr": {"uniform": [0.0, 1e-4]}}, "random", "tune.space.lr=0.0"),
        ({"gram_weight": {"loguniform": [1e-7, 1e-5]}}, "grid", "needs every parameter"),
        ({"gram_weight": {"grid": [1.0]}}, "optuna", "Optuna cannot sample"),
        ({"reward_weights": {"lpips": {"grid": [1.0]}}}, "grid", "no reward term named 'lpips'"),
    ],
)
def test_invalid_spaces_are_rejected_naming_the_parameter(space, search, message):
    with pytest.raises(ConfigError) as error:
        validate_sweep(sweep(space, search=search))
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("domain", "message"),
    [
        ({"loguniform": [0.0, 1.0]}, "needs low > 0"),
        ({"uniform": [2.0, 1.0]}, "low < high"),
        ({"grid": []}, "at least one value"),
        ({"grid": [1.0], "choice": [2.0]}, "exactly one of"),
    ],
)
def test_bad_domains_fail_at_load_with_the_key(domain, message):
    with pytest.raises(ConfigError) as error:
        sweep({"gram_weight": domain})
    assert "tune.space.gram_weight" in str(error.value) and message in str(error.value)


def test_split_forms_are_exclusive_and_paired():
    with pytest.raises(ConfigError, match="not both"):
        sweep({"split_index": {"grid": [8]}, "structure_end": {"grid": [5]}})
    with pytest.raises(ConfigError, match="go together"):
        sweep({"reward_start": {"grid": [9]}})
    with pytest.raises(ConfigError, match="sampler index"):
        sweep({"split_index": {"uniform": [2, 9]}})


def test_sweep_needs_validation_and_reports_at_validations():
    cfg = sweep({"gram_weight": {"grid": [1.0]}})
    no_val = cfg.model_copy(update={"data": cfg.data.model_copy(update={"val_source": None})})
    with pytest.raises(ConfigError, match="held-out validation"):
        validate_sweep(no_val)
    train = cfg.train.model_copy(update={"checkpoint_every": 15})
    with pytest.raises(ConfigError, match=r"multiple of train\.validate_every"):
        validate_sweep(cfg.model_copy(update={"train": train}))


def test_param_space_maps_domains_to_tune():
    from ray.tune.search.sample import Float, Integer

    cfg = sweep({"split_index": {"randint": [4, 9]}, "gram_weight": {"loguniform": [1e-3, 1.0]}})
    space = param_space(cfg)
    assert isinstance(space["split_index"], Integer)
    assert (space["split_index"].lower, space["split_index"].upper) == (4, 10)  # inclusive 9
    assert isinstance(space["gram_weight"], Float)
    assert "LogUniform" in type(space["gram_weight"].sampler).__name__
    assert param_space(sweep({"gram_weight": {"grid": [1, 2]}}))["gram_weight"] == {
        "grid_search": [1, 2]
    }


def test_objective_penalises_psnr_drop_beyond_tolerance_and_gram_beyond_bound():
    cfg = sweep(
        {"gram_weight": {"grid": [1.0]}},
        val_objective={"psnr_tolerance": 0.5, "psnr_penalty": 0.1, "gram_bound": 0.01},
    )
    metrics = {"val_reward_gmsd_gain": 0.02, "val_psnr_gain": -0.3, "val_gram_to_base": 0.005}
    assert objective_parts(cfg, metrics)["objective"] == pytest.approx(0.02)
    metrics.update(val_psnr_gain=-1.5, val_gram_to_base=0.03)  # 1 dB and 2× over the limits
    parts = objective_parts(cfg, metrics)
    assert parts["objective"] == pytest.approx(0.02 - 0.1 * 1.0 - 1.0 * 2.0)
    assert (parts["reward_gain"], parts["psnr_change"]) == (0.02, -1.5)
    other = sweep({"gram_weight": {"grid": [1.0]}}, val_objective={"reward": "ssim"})
    assert objective_parts(other, {"val_reward_ssim_gain": 0.4})["objective"] == 0.4
    assert math.isnan(objective_parts(other, {})["objective"])
    with pytest.raises(ConfigError, match="not a reward term"):
        validate_sweep(sweep({"gram_weight": {"grid": [1.0]}}, val_objective={"reward": "musiq"}))


def row(trial_id: str, gain: float, psnr: float, objective: float, **extra: object) -> TrialRow:
    values = dict(
        trial_id=trial_id, params={"gram_weight": 1.0}, structure_end=7, reward_start=8,
        gram_weight=1.0, reward_gain=gain, psnr_change=psnr, gram_distance=0.0,
        objective=objective, steps=40, asha_stopped=False, error=None,
    )  # fmt: skip
    values.update(extra)
    return TrialRow(**values)


def test_pareto_front_best_row_and_table():
    rows = [
        row("a", 0.03, -1.0, 0.01),
        row("b", 0.01, 0.2, 0.01),
        row("c", 0.00, -0.5, -0.1),
        row("d", 0.05, -0.1, 0.05, steps=10, asha_stopped=True),
        row("e", math.nan, math.nan, math.nan, error="boom"),
    ]
    assert [r.trial_id for r in pareto_front(rows)] == ["d", "b"]  # d dominates a and c
    assert best_row(rows).trial_id in ("a", "b")  # d was stopped early, e failed
    assert best_row([rows[3], rows[4]]).trial_id == "d"
    table = markdown_table(rows, best_row(rows))
    assert table.count("\n") == 6 and "(best)" in table and "error: boom" in table


def test_tune_config_file_loads_and_validates():
    cfg = load_config("configs/tune/tiny_split_gram.yaml")
    validate_sweep(cfg)
    assert cfg.tune.max_concurrent_trials == 2 and cfg.train.num_workers == 1
    cluster = load_config("configs/tune/gpu_cluster.yaml")
    validate_sweep(cluster)
    assert len(cluster.tune.space.parameters()) == 3


def test_train_local_mode_is_refused_in_a_sweep():
    """Tune trial functions cannot call ray.train.get_context(), which local mode needs: every
    trial failed with Ray's deprecation error before this check."""
    cfg = sweep({"gram_weight": {"grid": [1.0]}})
    local = cfg.train.model_copy(update={"num_workers": 0})
    with pytest.raises(ConfigError, match=r"train\.num_workers=0 .* set train\.num_workers=1"):
        validate_sweep(cfg.model_copy(update={"train": local}))
