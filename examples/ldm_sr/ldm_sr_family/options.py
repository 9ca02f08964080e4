"""`model.options` of the ldm_sr family: a typed, frozen schema in which unknown keys are errors.

rfsr_ray hands `model.options` to the builder as a free mapping, so validating it is ours; every
problem comes back as a `ConfigError` naming the key, the bad value and an example that works.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails

from rfsr_ray.errors import ConfigError


class LDMSROptions(BaseModel):
    """What a config may set under `model.options` for `builder: ldm_sr_family:build`."""

    # strict: YAML's `yes`/"1" are not silently read as booleans or numbers.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    eta: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="DDIM η of every sampler step, the pipeline's `eta`: 0 is deterministic DDIM "
        "(what rfsr_ray's sampler-index windows assume), 1 is what the CompVis model card samples "
        "with; DDPM ignores it",
        examples=[0.0, 1.0],
    )
    quantize: bool = Field(
        True,
        description="decode through the VQ codebook as the pipeline does (the codebook lookup "
        "passes gradients straight through); false decodes the raw latent",
        examples=[True, False],
    )


def parse_options(options: Mapping[str, Any]) -> LDMSROptions:
    """`model.options` validated, or a `ConfigError` listing every bad key and its fix."""
    if not isinstance(options, Mapping):
        raise ConfigError(
            f"model.options={options!r} must be a mapping of option names to values, "
            "e.g. {eta: 0.0, quantize: true}"
        )
    try:
        return LDMSROptions.model_validate(dict(options))
    except ValidationError as error:
        raise ConfigError("; ".join(_describe(problem) for problem in error.errors())) from None


def _describe(problem: ErrorDetails) -> str:
    """One pydantic error as `model.options.KEY=VALUE must ..., e.g. KEY: EXAMPLE`."""
    key = ".".join(str(part) for part in problem["loc"])
    known = sorted(LDMSROptions.model_fields)
    if problem["type"] == "extra_forbidden":
        return f"model.options.{key} is not an option of the ldm_sr family; use one of {known}"
    field = LDMSROptions.model_fields.get(str(problem["loc"][0]))
    example = field.examples[-1] if field is not None and field.examples else None
    # pydantic says "Input should be ...": name the key and the value instead.
    reason = problem["msg"].replace("Input should be", "must be", 1)
    return f"model.options.{key}={problem['input']!r} {reason}, e.g. {key}: {example!r}"
