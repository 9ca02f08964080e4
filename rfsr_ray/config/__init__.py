"""The config: one typed, frozen schema (`schema`) and its loading (`load`): YAML files, overrides,
readable errors, absolute paths for Ray workers."""

from rfsr_ray.config.load import (
    RENAMED_KEYS,
    apply_override,
    build_config,
    load_config,
    with_absolute_paths,
)
from rfsr_ray.config.schema import *  # noqa: F403  (the schema's classes and type aliases)
from rfsr_ray.config.schema import __all__ as _schema_names

__all__ = [
    "RENAMED_KEYS",
    "apply_override",
    "build_config",
    "load_config",
    "with_absolute_paths",
    *_schema_names,
]
