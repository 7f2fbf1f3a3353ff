"""params.yaml access: load, look up dotted keys, flatten for tracking."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS = Path("params.yaml")
_MISSING = object()


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict:
    with open(path) as f:
        params = yaml.safe_load(f) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return params


def lookup(params: dict, key: str, default: Any = _MISSING) -> Any:
    """``lookup(p, "loss.id")`` -> p["loss"]["id"]; KeyError naming the full key unless a default is given."""
    node: Any = params
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif default is not _MISSING:
            return default
        else:
            raise KeyError(f"params.yaml has no key {key!r}")
    return node


def flatten(params: dict, prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {"a.b.c": value}; lists become their string form (MLflow params are strings)."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{name}."))
        else:
            out[name] = v
    return out


def override(params: dict, assignments: list[str]) -> dict:
    """Apply ``key=value`` strings (YAML-parsed values), as ``dvc exp run -S`` does, to a copy of ``params``."""
    out = copy.deepcopy(params)
    for a in assignments:
        key, _, raw = a.partition("=")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw)
    return out
