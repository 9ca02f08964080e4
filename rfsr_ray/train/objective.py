"""The validation objective (`train.val_objective`, logged as `val_objective`): held-out reward
gain over the base model, penalised for lost fidelity.

Computed from the validation metrics of `rfsr_ray.train.validate` (already prefixed `val_`), so a
fine-tune reports the same number a sweep ranks trials by.
"""

from __future__ import annotations

import math

from rfsr_ray.config import RFSRConfig
from rfsr_ray.errors import ConfigError


def objective_reward(cfg: RFSRConfig) -> str:
    """The reward term whose held-out gain is maximised."""
    names = [term.name for term in cfg.losses.reward.terms]
    wanted = cfg.train.val_objective.reward
    if wanted is None:
        if not names:
            raise ConfigError(
                "the validation objective needs a reward: losses.reward.terms is empty; add a term "
                "or set train.val_objective.reward"
            )
        return names[0]
    if wanted not in names:
        raise ConfigError(
            f"train.val_objective.reward={wanted!r} is not a reward term; choose one of {names}"
        )
    return wanted


def objective_parts(cfg: RFSRConfig, metrics: dict[str, float]) -> dict[str, float]:
    """{reward_gain, psnr_change, gram_distance, objective} from `val_*` metrics, where
    `objective` is the validation objective's value.

    A missing metric (a trial without a Gram term has no distance) counts as no penalty; a
    missing reward gain makes the objective NaN, which Tune ranks last.
    """
    settings = cfg.train.val_objective
    reward_gain = metrics.get(f"val_reward_{objective_reward(cfg)}_gain", math.nan)
    psnr_change = metrics.get("val_psnr_gain", 0.0)
    gram_distance = metrics.get("val_gram_to_base", math.nan)
    value = reward_gain - settings.psnr_penalty * max(0.0, -psnr_change - settings.psnr_tolerance)
    if settings.gram_bound is not None and not math.isnan(gram_distance):
        value -= settings.gram_penalty * max(0.0, gram_distance / settings.gram_bound - 1.0)
    return {
        "reward_gain": reward_gain,
        "psnr_change": psnr_change,
        "gram_distance": gram_distance,
        "objective": value,
    }
