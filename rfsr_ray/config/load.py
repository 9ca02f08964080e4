"""Reading configs: YAML files, `key.sub=value` overrides, readable validation errors, renamed keys,
and local paths made absolute for Ray workers. The schema itself is `rfsr_ray.config.schema`."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from rfsr_ray.config.schema import PathField, RFSRConfig
from rfsr_ray.errors import ConfigError
from rfsr_ray.hub import looks_local

# Keys that moved, old → new: a config written for an earlier release gets the fix, not just
# "unknown key".
RENAMED_KEYS = {
    "train.objective": "train.loss",
    "tune.objective": "train.val_objective",
    "output.dir": "prepare.dir",
    "output.overwrite": "prepare.overwrite",
    "output.preview_rows": "prepare.preview_rows",
    "output.row_group_size": "prepare.row_group_size",
}


def _parse_value(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override to a nested dict in place (list items by index)."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(
            f"override {override!r} must look like key.sub=value, e.g. train.steps=100"
        )
    node: Any = tree
    parts = key.strip().split(".")
    for position, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, key)]
            continue
        child = node.get(part)
        if part.isdigit() or (parts[position + 1].isdigit() and not isinstance(child, list)):
            list_key = ".".join(parts[: position + 1 + (not part.isdigit())])
            raise ConfigError(
                f"override {key!r}: {list_key} is not a list in the config file, so an item "
                f"cannot be set by index; give the whole list, e.g. "
                f"{list_key}=[{{name: gmsd, weight: 0.1}}]"
            )
        if not isinstance(child, (dict, list)):
            child = node[part] = {}
        node = child
    if isinstance(node, list):
        node[_list_index(node, parts[-1], key)] = _parse_value(text)
    else:
        node[parts[-1]] = _parse_value(text)


def _list_index(items: list[Any], part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(
            f"override key {key!r}: {part!r} is not an index of a {len(items)}-item list"
        )
    return int(part)


def _format_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"] if not str(p).startswith("function-"))
        bad = json.dumps(item.get("input"), default=str)
        if len(bad) > 80:
            bad = bad[:77] + "..."
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = "unknown key; check the spelling against `--print-config`"
        lines.append(f"  {loc}={bad}: {msg}" if loc else f"  {msg}")
    return "invalid config:\n" + "\n".join(lines)


def _renamed(tree: Mapping[str, Any]) -> list[str]:
    found = []
    for old, new in RENAMED_KEYS.items():
        section, key = old.split(".")
        if isinstance(tree.get(section), Mapping) and key in tree[section]:
            found.append(f"  {old} was renamed {new}; move the value there")
    return found


def _absolute(path: str | None) -> str | None:
    if path is None or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def _absolute_field(value: Any, marker: PathField, family: str) -> Any:
    """Folders made absolute; Hugging Face hub ids (`owner/name`) kept where allowed; a tuple
    of paths (`LocalPaths`) item by item."""
    if isinstance(value, tuple):
        return tuple(_absolute_field(item, marker, family) for item in value)
    hub_id_allowed = marker.kind == "hub_or_local" or (marker.kind == "model" and family != "tiny")
    if value is None or (hub_id_allowed and not looks_local(value)):
        return value
    return _absolute(value)


def _absolutise(node: BaseModel, family: str) -> BaseModel:
    """`node` with every `PathField`-marked string made absolute, recursing into sub-configs
    and tuples of them."""
    updates: dict[str, Any] = {}
    for name, field in type(node).model_fields.items():
        value = getattr(node, name)
        marker = next((m for m in field.metadata if isinstance(m, PathField)), None)
        if marker is not None:
            updates[name] = _absolute_field(value, marker, family)
        elif isinstance(value, BaseModel):
            updates[name] = _absolutise(value, family)
        elif isinstance(value, tuple) and any(isinstance(item, BaseModel) for item in value):
            updates[name] = tuple(_absolutise(item, family) for item in value)
    return node.model_copy(update=updates)


def with_absolute_paths(cfg: RFSRConfig) -> RFSRConfig:
    """Local paths made absolute: Ray workers run in other working directories. Every field typed
    `LocalPath`, `OptionalLocalPath`, `HubOrLocalPath` or `ModelSource` in the schema is covered."""
    return build_config(_absolutise(cfg, cfg.model.family).to_dict())


def build_config(tree: Mapping[str, Any] | None = None) -> RFSRConfig:
    """Validate a nested dict into an `RFSRConfig`, raising `ConfigError` with every problem."""
    renamed = _renamed(tree or {})
    if renamed:
        raise ConfigError("invalid config:\n" + "\n".join(renamed))
    try:
        return RFSRConfig.model_validate(dict(tree or {}))
    except ValidationError as error:
        raise ConfigError(_format_error(error)) from None


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RFSRConfig:
    """Read a YAML file (or only defaults when `path` is None) and apply overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"config file {str(path)!r} does not exist; pass --config configs/…yaml"
            )
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
        tree = copy.deepcopy(loaded)
    for override in overrides:
        apply_override(tree, override)
    return build_config(tree)
