"""The run's config as loaded for training: the YAML layers of :mod:`ccat.config`, with the
chosen method's ``ccat/configs/methods/<name>.yaml`` and its ``method.params`` checked against the
method's ``Params`` and resolved. It sits above the method registry, which
:mod:`ccat.config` (imported by every layer) must not import, and above the data, whose
manifest names the dataset that ``protocol: released`` picks the release's settings for.

A method's file may hold, beside its layer, ``released``: per dataset (the manifest's
``dataset``), the optimizer, schedule, batch and epochs of the authors' code, with the
``source`` they are read from (repository, commit, file:line)::

    released:
      cremad:
        source: "GeWu-Lab/OGM-GE_CVPR2022@<commit> main.py:L160-161"
        optim: {name: sgd, lr: 0.001, momentum: 0.9, weight_decay: 0.0001, epochs: 100}
        data: {batch_size: 64}
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ccat.config import (METHOD_CONFIGS, ConfigError, RunConfig, check_ranges, merge, nest,
                         parse_override, parse_params, read_yaml, shown)
from ccat.data.reader import open_dataset
from ccat.methods import METHODS

RELEASED = "released"  # the key of a method file's released settings, per dataset
# What a released layer may set: the training settings the protocol is about.
RELEASED_KEYS = {"source": None, "optim": None, "data": {"batch_size"}}


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                cli: dict[str, Any] | None = None,
                method_configs: Path | None = METHOD_CONFIGS) -> RunConfig:
    """Defaults, then the chosen method's ``ccat/configs/methods/<name>.yaml`` (its paper's
    settings), then the YAML file, then (``protocol: released``) the method file's
    ``released.<dataset>`` layer, then ``--set`` overrides, then ``cli``: CLI options
    given as ``{'data.path': ...}`` (None = not given).

    ``method.params`` in a layer that also names ``method.name`` are that method's: they
    apply only when it is the chosen method (a dataset's file may hold CCAT's settings and
    still train a baseline), and are checked against it either way. Params in a layer
    that names no method are the chosen method's. The result holds every param, resolved.
    """
    layers = [read_yaml(path)] if path is not None else []
    if layers and method_configs and Path(path).resolve().parent == method_configs.resolve():
        layers[0].pop(RELEASED, None)  # a method's file as --config: its released settings
        # are read from it as the method's file below
    after = [parse_override(text) for text in overrides]
    after += [nest(dotted, value) for dotted, value in (cli or {}).items() if value is not None]
    probe = RunConfig()
    for values in layers + after:
        merge(probe, values)
    method_file = method_configs / f"{probe.method.name}.yaml" if method_configs else None
    if method_file is not None and method_file.is_file():
        base = read_yaml(method_file)
        released = base.pop(RELEASED, {})
        layers.insert(0, base)
        if probe.protocol == RELEASED:
            layers.append(released_layer(released, method_file, released_dataset(probe)))
    elif probe.protocol == RELEASED and method_file is not None:
        raise ConfigError(f"protocol released takes the method's released settings from "
                          f"{method_file or 'ccat/configs/methods/'}, which does not exist; add "
                          f"one, or train with protocol shared")
    cfg = RunConfig()
    for values in layers + after:
        merge(cfg, _for_method(values, probe.method.name))
    cfg.optim.resolve()
    resolve_params(cfg)
    check_ranges(cfg)
    return cfg


def released_dataset(cfg: RunConfig) -> str:
    """The dataset the run trains on, as its manifest names it (``cremad``, ``ks``): the
    key of the released settings."""
    if not cfg.data.path:
        raise ConfigError("protocol released picks the release's settings by the data's "
                          "dataset; pass --data PATH or set data.path")
    return str(open_dataset(cfg.data.path, cfg.data.cache_dir or None).manifest["dataset"])


def released_layer(released: Any, method_file: Path, dataset: str) -> dict[str, Any]:
    """``released[dataset]`` of ``method_file`` as a config layer, checked: a mapping with
    its ``source`` and only the settings RELEASED_KEYS allows."""
    where = f"{method_file}'s {RELEASED}"
    if not isinstance(released, dict):
        raise ConfigError(f"{where} must be a mapping of datasets, got {shown(released)}")
    if dataset not in released:
        known = ", ".join(map(str, released)) or "none"
        raise ConfigError(f"{method_file} has no {RELEASED}.{dataset} (the settings of the "
                          f"authors' code for dataset {dataset}; it has {known}); add them, "
                          f"citing the release's file and line, or train it with protocol "
                          f"shared")
    layer = released[dataset]
    if not isinstance(layer, dict) or not isinstance(layer.get("source"), str):
        raise ConfigError(f"{where}.{dataset} must be a mapping with a source (the "
                          f"release's repository, commit, file and line)")
    for key, value in layer.items():
        allowed = RELEASED_KEYS.get(key, ())
        inner = set(value) - allowed if allowed and isinstance(value, dict) else set()
        if key not in RELEASED_KEYS or inner:
            name = f"{key}.{sorted(inner)[0]}" if inner else key
            raise ConfigError(f"{where}.{dataset} sets {name}; a released layer sets only "
                              f"the optimizer (optim), data.batch_size and its source")
    return {k: v for k, v in layer.items() if k != "source"}


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
