"""Configuration: packaged defaults <- a YAML file <- command-line overrides.

Every stage reads its settings through `load_config`, so a value has one name everywhere
(`train.lr_aps` in YAML, in `dvc.yaml` params and in `dvc exp run -S`).
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml

DEFAULTS_PATH = Path(__file__).resolve().parent.parent / "configs" / "defaults.yaml"


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which key and why."""


def deep_merge(base: dict, update: dict, where: str = "") -> dict:
    """Return `base` updated by `update`, recursing into dicts; unknown keys are an error."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        dotted = f"{where}{key}"
        if key not in merged:
            close = difflib.get_close_matches(str(key), [str(k) for k in merged], n=1, cutoff=0.5)
            hint = f"did you mean '{where}{close[0]}'? " if close else ""
            raise ConfigError(f"unknown config key '{dotted}' ({hint}see configs/defaults.yaml for the valid keys)")
        if isinstance(merged[key], dict) and isinstance(value, dict):
            merged[key] = deep_merge(merged[key], value, dotted + ".")
        elif isinstance(merged[key], dict):
            raise ConfigError(f"config key '{dotted}' is a section; give its fields, not a value")
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def dotted_to_nested(overrides: dict[str, Any]) -> dict:
    """{'train.lr_aps': 1e-3} -> {'train': {'lr_aps': 1e-3}}; None values are dropped (flag not given)."""
    nested: dict = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """Defaults, then the YAML file at `path` (if any), then dotted `overrides` (None = not given)."""
    config = read_yaml(DEFAULTS_PATH)
    if path is not None:
        config = deep_merge(config, read_yaml(path))
    if overrides:
        config = deep_merge(config, dotted_to_nested(overrides))
    return config
