"""Search spaces: YAML domains → Ray Tune domains, trial parameters → fine-tune configs, and the
checks that reject an invalid space before any trial starts."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from typing import Any

from rfsr_ray.config import DomainConfig, RFSRConfig, build_config
from rfsr_ray.config.load import apply_override
from rfsr_ray.errors import ConfigError
from rfsr_ray.train.objective import objective_reward

SPLIT_PARAMETERS = ("split_index", "structure_end", "reward_start")
# Integer ranges up to this size are checked value by value; larger ones by their end points.
_ENUMERATE_LIMIT = 1000


def tune_domain(domain: DomainConfig) -> Any:
    from ray import tune

    values = list(domain.values)
    match domain.kind:
        case "grid":
            return tune.grid_search(values)
        case "choice":
            return tune.choice(values)
        case "uniform":
            return tune.uniform(*values)
        case "loguniform":
            return tune.loguniform(*values)
        case _:  # randint: ours is inclusive, Tune's upper bound is exclusive
            return tune.randint(values[0], values[1] + 1)


VARIANT = "variant"  # the trial parameter naming one of tune.variants


def param_space(cfg: RFSRConfig) -> dict[str, Any]:
    """Tuner param_space: flat parameter name → Tune domain; `variant` crosses every declared
    variant with the other grids."""
    from ray import tune

    space = {name: tune_domain(d) for name, d in cfg.tune.space.parameters().items()}
    if cfg.tune.variants:
        space[VARIANT] = tune.grid_search(list(cfg.tune.variants))
    return space


def parameter_names(cfg: RFSRConfig) -> list[str]:
    """The names of a trial's parameters, `variant` first when the sweep has variants."""
    return ([VARIANT] if cfg.tune.variants else []) + list(cfg.tune.space.parameters())


def apply_variant(tree: dict[str, Any], name: str, overrides: Mapping[str, Any]) -> None:
    """Set a variant's {dotted.key: value} overrides on a config tree, as the command line
    would (the value goes through JSON, which YAML reads back unchanged)."""
    for key, value in overrides.items():
        try:
            apply_override(tree, f"{key}={json.dumps(value)}")
        except ConfigError as error:
            raise ConfigError(f"tune.variants.{name}: {error}") from None


def _apply(tree: dict[str, Any], name: str, value: Any, variants: Mapping[str, Any]) -> None:
    if name == VARIANT:
        if value not in variants:
            raise ConfigError(f"unknown variant {value!r}; tune.variants has {sorted(variants)}")
        apply_variant(tree, value, variants[value])
    elif name == "seed":
        tree["train"]["seed"] = tree["data"]["seed"] = int(value)
    elif name == "split_index":
        tree["schedule"]["split"] = {"structure_end": int(value) - 1, "reward_start": int(value)}
    elif name in ("structure_end", "reward_start"):
        tree["schedule"]["split"] = {**(tree["schedule"]["split"] or {}), name: int(value)}
    elif name == "gram_weight":
        tree["losses"]["gram"]["weight"] = float(value)
    elif name == "lr":
        tree["train"]["lr"] = float(value)
    elif name.startswith("reward_weights."):
        reward = name.removeprefix("reward_weights.")
        terms = [t for t in tree["losses"]["reward"]["terms"] if t["name"] == reward]
        if not terms:
            known = [t["name"] for t in tree["losses"]["reward"]["terms"]]
            raise ConfigError(
                f"tune.space.reward_weights.{reward}: no reward term named {reward!r}; "
                f"losses.reward.terms has {known}"
            )
        for term in terms:
            term["weight"] = float(value)
    else:
        raise ConfigError(f"unknown sweep parameter {name!r}")


def trial_config(cfg: RFSRConfig, params: Mapping[str, Any]) -> RFSRConfig:
    """The fine-tune config of one trial: the base config with the trial's parameters set."""
    tree = cfg.to_dict()
    # The variant first: the other parameters are set on top of its overrides.
    for name in sorted(params, key=lambda name: name != VARIANT):
        _apply(tree, name, params[name], cfg.tune.variants)
    return build_config(tree)


def describe(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in params.items())


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _candidates(name: str, domain: DomainConfig) -> list[Any]:
    """Values to check: every listed value, every split index of a small integer range, and
    the end points of continuous ranges."""
    low_high = domain.kind in ("uniform", "loguniform", "randint")
    if domain.kind == "randint" and name in SPLIT_PARAMETERS:
        low, high = domain.values
        if high - low < _ENUMERATE_LIMIT:
            return list(range(int(low), int(high) + 1))
    return list(domain.values) if not low_high else [domain.values[0], domain.values[1]]


def validate_sweep(cfg: RFSRConfig) -> None:
    """Reject a sweep that cannot run, before any trial starts; every message names the
    parameter and the fix."""
    space = cfg.tune.space
    parameters = space.parameters()
    if not parameters and not cfg.tune.variants:
        raise ConfigError(
            "tune.space is empty: declare at least one parameter, e.g. "
            "tune.space.gram_weight={loguniform: [1.0e-7, 1.0e-5]}"
        )
    _check_search_kind(cfg, parameters)
    _check_training_setup(cfg)
    objective_reward(cfg)
    split = {n: d for n, d in parameters.items() if n in SPLIT_PARAMETERS}
    for values in itertools.product(*(_candidates(n, d) for n, d in split.items())):
        _check_trial(cfg, dict(zip(split, values, strict=True)))
    for name, domain in parameters.items():
        if name not in SPLIT_PARAMETERS:
            for value in _candidates(name, domain):
                _check_trial(cfg, {name: value})
    for variant in cfg.tune.variants:
        _check_trial(cfg, {VARIANT: variant})


def _check_trial(cfg: RFSRConfig, params: dict[str, Any]) -> None:
    try:
        trial_config(cfg, params)
    except ConfigError as error:
        where = ", ".join(
            f"tune.variants.{v}" if k == VARIANT else f"tune.space.{k}={v}"
            for k, v in params.items()
        )
        detail = str(error).removeprefix("invalid config:\n").strip()
        raise ConfigError(
            f"{where} gives an invalid fine-tune config: {detail}; change or drop that value"
        ) from None


def _check_search_kind(cfg: RFSRConfig, parameters: dict[str, DomainConfig]) -> None:
    search = cfg.tune.search
    if search == "optuna" and cfg.tune.variants:
        raise ConfigError(
            "tune.variants are crossed as a grid, which Optuna cannot sample; use "
            "tune.search=grid for an ablation"
        )
    for name, domain in parameters.items():
        if search == "grid" and domain.kind != "grid":
            raise ConfigError(
                f"tune.space.{name} is {domain.kind}, but tune.search=grid needs every parameter "
                "as {grid: [...]}; use tune.search=random or optuna for sampled ranges"
            )
        if search == "optuna" and domain.kind == "grid":
            raise ConfigError(
                f"tune.space.{name} is a grid, which Optuna cannot sample; write it as "
                "{choice: [...]} or use tune.search=grid"
            )


def _check_training_setup(cfg: RFSRConfig) -> None:
    if cfg.train.loss != "rfsr":
        raise ConfigError("a sweep fine-tunes with RFSR: set train.loss=rfsr")
    if cfg.data.val_source is None and cfg.data.val_pairs is None:
        raise ConfigError(
            "a sweep ranks trials on held-out validation: set data.val_source or data.val_pairs"
        )
    if cfg.train.num_workers == 0:
        # Train's local mode calls ray.train.get_context(), which Ray Tune refuses inside a
        # trial function: every trial would fail with Ray's deprecation error.
        raise ConfigError(
            "train.num_workers=0 (Train local mode) cannot run inside Tune trials: set "
            "train.num_workers=1 or more"
        )
    if cfg.train.checkpoint_every % cfg.train.validate_every:
        raise ConfigError(
            f"train.checkpoint_every={cfg.train.checkpoint_every} must be a multiple of "
            f"train.validate_every={cfg.train.validate_every} in a sweep, so that every report "
            "to Tune carries a fresh validation objective"
        )
    if cfg.tune.scheduler.kind == "asha" and cfg.tune.scheduler.grace_period > cfg.train.steps:
        raise ConfigError(
            f"tune.scheduler.grace_period={cfg.tune.scheduler.grace_period} exceeds "
            f"train.steps={cfg.train.steps}; ASHA could never stop a trial"
        )
