"""Plug-in model families: `model.family: plugin` names a builder by import path (torchtune's
`_component_`), so a user's diffusion SR model trains without editing this library.

`model.builder: "package.module:function"` is called as `function(cfg, scale, trainable)` with the
`ModelConfig` (its free `options` mapping is the builder's to validate) and must return an
`ISRDiffusionModel`. The import is checked on the driver before Ray starts (`check_plugin`), and
every Ray worker imports it again, so the package must be importable there: installed on every
node, shipped with `ray job submit --working-dir`, or listed in `model.py_modules`
(docs/plugins.md).
An export records the builder, so `load_model` rebuilds a plug-in export from its folder alone.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from rfsr_ray.config import ModelConfig
from rfsr_ray.errors import ConfigError, WeightsError
from rfsr_ray.models.protocol import ISRDiffusionModel

Builder = Callable[[ModelConfig, int, bool], ISRDiffusionModel]
PLUGIN_HELP = "docs/plugins.md"

# Every member a conforming object has: the protocol's attributes and methods (typing offers
# `get_protocol_members` only from Python 3.13).
PROTOCOL_MEMBERS = tuple(
    sorted(
        set(ISRDiffusionModel.__annotations__)
        | {name for name, value in vars(ISRDiffusionModel).items()
           if callable(value) and not name.startswith("_")}
    )
)  # fmt: skip


def add_to_sys_path(py_modules: Iterable[str]) -> None:
    """Make `model.py_modules` importable in this process, as Ray makes them on its workers: a
    package folder by its parent directory, a .whl/.zip file by itself."""
    for entry in py_modules:
        path = Path(entry)
        if not (path.is_dir() or path.suffix in (".whl", ".zip")):
            raise ConfigError(
                f"model.py_modules entry {entry!r} is not a folder or a .whl/.zip file (or does "
                "not exist); list package folders (the folder holding __init__.py) or wheels, "
                "as Ray's runtime_env py_modules takes them"
            )
        root = str(path.parent if path.is_dir() else path)
        if root not in sys.path:
            sys.path.insert(0, root)


def import_builder(path: str, where: str = "model.builder") -> Builder:
    """The callable at `package.module:attribute`, or a `ConfigError` naming `path` and the fix."""
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ConfigError(
            f"{where}={path!r}: cannot import {module_name!r} ({error}); install the package "
            f"(pip install -e), list its folder in model.py_modules, or run from the folder that "
            f"holds it (see {PLUGIN_HELP})"
        ) from None
    except Exception as error:  # a user's module failing at import: say which and why
        raise ConfigError(
            f"{where}={path!r}: importing {module_name!r} failed: {type(error).__name__}: {error}"
        ) from error
    found: Any = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            public = sorted(n for n in vars(module) if not n.startswith("_"))
            raise ConfigError(
                f"{where}={path!r}: {module_name!r} has no attribute {attribute!r}; it "
                f"defines {public}"
            )
        found = getattr(found, part)
    if not callable(found):
        raise ConfigError(
            f"{where}={path!r} is a {type(found).__name__}, not a callable "
            "build(cfg, scale, trainable)"
        )
    return found


def missing_members(model: object) -> list[str]:
    """The protocol members `model` lacks (empty: it conforms, as far as names go)."""
    return [name for name in PROTOCOL_MEMBERS if not hasattr(model, name)]


def check_built(model: object, path: str, scale: int) -> ISRDiffusionModel:
    """`model` as the builder at `path` returned it, refused unless it is an ISRDiffusionModel
    of the configured scale."""
    missing = missing_members(model)
    if missing:
        raise ConfigError(
            f"model.builder={path!r} returned a {type(model).__name__}, which lacks the "
            f"ISRDiffusionModel members {missing}; implement them (see {PLUGIN_HELP})"
        )
    if getattr(model, "scale", None) != scale:
        raise ConfigError(
            f"model.builder={path!r} returned a x{getattr(model, 'scale', '?')} model for "
            f"data.scale={scale}; set data.scale to the model's factor"
        )
    return model  # type: ignore[return-value]


def build_plugin(cfg: ModelConfig, scale: int, trainable: bool) -> ISRDiffusionModel:
    """The plug-in model of `cfg`: `builder(cfg, scale, trainable)`, checked."""
    assert cfg.builder is not None  # the schema requires it for family=plugin
    add_to_sys_path(cfg.py_modules)
    model = import_builder(cfg.builder)(cfg, scale, trainable)
    return check_built(model, cfg.builder, scale)


def check_plugin(cfg: ModelConfig) -> None:
    """On the driver, before Ray starts: `model.py_modules` exist and the builder imports."""
    add_to_sys_path(cfg.py_modules)
    if cfg.family == "plugin":
        assert cfg.builder is not None
        import_builder(cfg.builder)


def plugin_record(model: ISRDiffusionModel, cfg: ModelConfig) -> dict[str, Any]:
    """What `rfsr_model.json` of a plug-in export holds: enough for `load_plugin_export`."""
    return {
        "family": "plugin",
        "name": model.family,
        "builder": cfg.builder,
        "options": cfg.options,
        "scale": model.scale,
        "model_config": cfg.model_dump(mode="json"),
    }


def write_plugin_record(
    path: Path, model: ISRDiffusionModel, cfg: ModelConfig, info_file: str
) -> None:
    """Merge the plug-in record into `info_file` (the builder's own keys, if it wrote one, stay)."""
    record_path = path / info_file
    existing = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record_path.write_text(json.dumps({**existing, **plugin_record(model, cfg)}, indent=2))


def load_plugin_export(path: Path, info: dict[str, Any]) -> ISRDiffusionModel:
    """Rebuild a plug-in export for inference: its builder, its options, its own folder."""
    recorded = ModelConfig.model_validate(info["model_config"])
    # The training run's py_modules folders may not exist where the export is used; the
    # package may be installed there instead (import_builder says what to do if not).
    shipped = tuple(entry for entry in recorded.py_modules if Path(entry).exists())
    cfg = recorded.model_copy(
        update={"pretrained": str(path), "pretrain_config": None, "py_modules": shipped}
    )
    try:
        return build_plugin(cfg, int(info["scale"]), trainable=False)
    except ConfigError as error:
        raise WeightsError(
            f"{str(path)!r} is a plug-in export that cannot be rebuilt: {error}"
        ) from None
