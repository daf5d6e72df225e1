"""The run's config as loaded for training: the YAML layers of :mod:`ccat.config`, with the
chosen method's ``configs/methods/<name>.yaml`` and its ``method.params`` checked against the
method's ``Params`` and resolved. It sits above the method registry, which
:mod:`ccat.config` (imported by every layer) must not import.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ccat.config import (METHOD_CONFIGS, RunConfig, check_ranges, merge, nest, parse_override,
                         parse_params, read_yaml)
from ccat.methods import METHODS


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                cli: dict[str, Any] | None = None,
                method_configs: Path | None = METHOD_CONFIGS) -> RunConfig:
    """Defaults, then the chosen method's ``configs/methods/<name>.yaml`` (its paper's
    settings), then the YAML file, then ``--set`` overrides, then ``cli``: CLI options
    given as ``{'data.path': ...}`` (None = not given).

    ``method.params`` in a layer that also names ``method.name`` are that method's: they
    apply only when it is the chosen method (a dataset's file may hold CCAT's settings and
    still train a baseline), and are checked against it either way. Params in a layer
    that names no method are the chosen method's. The result holds every param, resolved.
    """
    layers = [read_yaml(path)] if path is not None else []
    layers += [parse_override(text) for text in overrides]
    layers += [nest(dotted, value) for dotted, value in (cli or {}).items() if value is not None]
    probe = RunConfig()
    for values in layers:
        merge(probe, values)
    method_file = method_configs / f"{probe.method.name}.yaml" if method_configs else None
    if method_file is not None and method_file.is_file():
        layers.insert(0, read_yaml(method_file))
    cfg = RunConfig()
    for values in layers:
        merge(cfg, _for_method(values, probe.method.name))
    cfg.optim.resolve()
    resolve_params(cfg)
    check_ranges(cfg)
    return cfg


def _for_method(values: dict[str, Any], chosen: str) -> dict[str, Any]:
    """One layer without the ``method.params`` of a method other than ``chosen`` (after
    checking them against that method's)."""
    method = values.get("method")
    if not isinstance(method, dict) or method.get("name", chosen) == chosen \
            or "params" not in method:
        return values
    check_params(method["name"], method["params"])
    return {**values, "method": {k: v for k, v in method.items() if k != "params"}}


def params_type(method: str) -> type | None:
    """The ``Params`` dataclass of the registered method ``method`` (None: it has none)."""
    return METHODS.get(method).Params


def check_params(method: str, values: Any) -> Any:
    """``values`` as the registered method ``method``'s ``Params`` (:func:`parse_params`)."""
    return parse_params(params_type(method), values, method)


def resolve_params(cfg: RunConfig) -> None:
    """Check ``cfg.method.params`` against the chosen method and fill in every default, so
    a saved run records each value it trained with."""
    params = check_params(cfg.method.name, cfg.method.params)
    cfg.method.params = dataclasses.asdict(params) if params is not None else {}
