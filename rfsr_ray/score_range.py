"""pyiqa score ranges: parsed to numbers, negated for lower-is-better metrics, and read from
pyiqa's static table without importing pyiqa.

pyiqa declares one range string per metric (`pyiqa/default_model_configs.py`), in these forms:
- two bounds, exact or approximate ("~"): "0, 1", "-2, 2", "0, ~1", "~0, ~100", "~-1, ~0.1";
- an open bound, written as a bare "~": "0, ~" (mad, fid), "~0, ~" (pi), "~, 2" (afine_all);
- several heads: "quality: 0, 1; rank: 0, 2; rank_prob: 0, 1" (fgresq_pair).
Only the first form can map a score onto [0, 1] (`normalize: true`); approximate bounds are used
as they are, so a score past one lands slightly outside [0, 1] (it is not clipped, which would
zero its gradient).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from rfsr_ray.errors import ConfigError

APPROXIMATE = "~"  # pyiqa's mark for a rough bound; alone it marks an open one


@dataclass(frozen=True)
class Bound:
    value: float | None  # None: open (unbounded or unknown)
    approximate: bool

    def __str__(self) -> str:
        if self.value is None:
            return APPROXIMATE
        number = f"{self.value + 0.0:g}"  # + 0.0 turns −0 into 0
        return APPROXIMATE + number if self.approximate else number


@dataclass(frozen=True)
class ScoreRange:
    low: Bound
    high: Bound

    def __str__(self) -> str:
        return f"{self.low}, {self.high}"

    def negated(self) -> ScoreRange:
        """The range of −score: [low, high] → [−high, −low], approximate marks kept."""

        def minus(bound: Bound) -> Bound:
            value = None if bound.value is None else -bound.value
            return Bound(value, bound.approximate)

        return ScoreRange(minus(self.high), minus(self.low))


def parse_score_range(text: str | None) -> ScoreRange | None:
    """pyiqa's range string → numbers, e.g. "0, ~1" → [0, ≈1], "0, ~" → [0, open];
    None when there is no range or it has several heads ("quality: 0, 1; rank: 0, 2")."""
    parts = (text or "").split(",")
    if len(parts) != 2:
        return None
    bounds = []
    for part in parts:
        number = part.strip().replace(APPROXIMATE, "")  # also reads "-~1", our old flip's form
        approximate = APPROXIMATE in part
        if not number:
            bounds.append(Bound(None, approximate))
            continue
        try:
            value = float(number)
        except ValueError:
            return None
        bounds.append(Bound(value if math.isfinite(value) else None, approximate))
    return ScoreRange(*bounds)


def higher_better_range(text: str | None, lower_better: bool) -> str | None:
    """The range of the reward (the metric negated when lower is better), as a pyiqa-style
    string: "0, ~1" of a lower-is-better metric → "~-1, 0". None when it cannot be negated."""
    if not lower_better:
        return text
    parsed = parse_score_range(text)
    return None if parsed is None else str(parsed.negated())


def normalisation_bounds(name: str, text: str | None, lower_better: bool) -> tuple[float, float]:
    """(low, high) of the reward (higher is better) that `normalize: true` maps to (0, 1);
    a `ConfigError` naming the range unless it has two finite bounds, approximate or not."""
    parsed = parse_score_range(text)
    low, high = (None, None) if parsed is None else (parsed.low.value, parsed.high.value)
    if parsed is None:
        why = "it has no declared range" if not text else "it is not one 'low, high' pair"
    elif low is None or high is None:
        why = "one bound is open ('~' alone) or infinite"
    elif not low < high:
        why = "its low bound is not below its high bound"
    else:
        return (-high, -low) if lower_better else (low, high)
    raise ConfigError(
        f"reward {name!r} cannot be normalised: normalize: true maps the score onto [0, 1] "
        f"with two finite bounds, but its score range is {text!r} ({why}); set normalize: "
        "false for this reward"
    )


def declared_range(name: str) -> tuple[str | None, bool] | None:
    """(score range string, lower_better) of a pyiqa metric from pyiqa's static table, or None
    when the metric is unknown or the table cannot be read (the metric's build then decides)."""
    entry = _pyiqa_table().get(name)
    if entry is None:
        return None
    return entry.get("score_range"), bool(entry.get("lower_better", False))


@cache
def _pyiqa_table() -> dict[str, Any]:
    """pyiqa's DEFAULT_CONFIGS, executed from its file alone: about 1 ms, where `import pyiqa`
    (its package imports every architecture) takes seconds and ~200 MB in each process."""
    spec = importlib.util.find_spec("pyiqa")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / "default_model_configs.py"
    table_spec = importlib.util.spec_from_file_location("_pyiqa_default_model_configs", path)
    if not path.is_file() or table_spec is None or table_spec.loader is None:
        return {}
    module = importlib.util.module_from_spec(table_spec)
    table_spec.loader.exec_module(module)
    return dict(getattr(module, "DEFAULT_CONFIGS", {}))
