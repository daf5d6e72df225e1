"""Typed run configuration: dataclasses with the paper's defaults, strict YAML, overrides.

A run's config is layered: the dataclass defaults, then a YAML file, then ``--set
key=value`` overrides. Loading is strict: an unknown key, a value of the wrong type or a
number outside its field's range (each dataclass's ``RANGES``) is a :class:`ConfigError`
naming the dotted key. Numbers in scientific notation (``1e-3``) are floats, as in YAML 1.2.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from ccat.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override names an unknown key or gives a value of the wrong type."""


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric field: finite, from ``low`` (excluded if ``low_open``)
    to ``high`` (excluded if ``high_open``). Both ends are required: a knob without an upper
    end lets a typo (``threads=100000``, ``frame_size=100000``) crash or exhaust memory."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False  # (an int may be too large for math.isfinite)
        above = value > self.low or (value == self.low and not self.low_open)
        return above and (value < self.high or (value == self.high and not self.high_open))

    def __str__(self) -> str:
        return (f"in {'(' if self.low_open else '['}{_number(self.low)}, "
                f"{_number(self.high)}{')' if self.high_open else ']'}")


def _number(value: float) -> str:
    """``1000000`` and ``0.5``, not ``1e+06``: a range's ends as a user would type them."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# The upper end of a count, weight or scale that has no tighter one: far above any sensible
# value (epochs, windows, loss weights), so only a typo (an extra zero run, 1e60) meets it.
LARGE = 1_000_000
POSITIVE = Range(0, LARGE, low_open=True)
NON_NEGATIVE = Range(0, LARGE)
AT_LEAST_ONE = Range(1, LARGE)
FRACTION = Range(0, 1)  # [0, 1]
SEED_RANGE = Range(0, 2**32 - 1)  # what numpy's seed accepts
LEARNING_RATE = Range(0, 10, low_open=True)
WIDTH = Range(1, 16384)  # channels or features of one layer: 16384 x 16384 floats = 1 GiB


@dataclass
class DataConfig:
    """Where the shards are and how batches are made from them."""

    RANGES: ClassVar[dict[str, Range]] = {
        "batch_size": Range(1, 65536), "workers": Range(0, 256),
        "shuffle_buffer": Range(1, 100_000),  # raw samples held in memory
        "frame_size": Range(0, 1024),  # px; the paper's 224, and 1024 costs 21x its memory
        "crop_scale_min": Range(0, 1, low_open=True),
        "prefetch": Range(1, 64)}  # batches per worker held in memory
    path: str = ""  # a folder, an http(s):// URL or any fsspec URL
    cache_dir: str = ""  # where remote shards are kept; "" = $CCAT_CACHE_DIR or ~/.cache/ccat
    batch_size: int = 32  # paper
    workers: int = 2
    shuffle_buffer: int = 512
    frame_size: int = 0  # 0 = the manifest's frame size (224 for the paper's shards)
    crop_scale_min: float = 0.08  # RandomResizedCrop's default lower bound
    val_split: str = "val"
    # Decode each split once into tensors on the device and augment there (random resized
    # crop and flip per sample, batched), so later epochs do no CPU decoding. For datasets
    # that fit in accelerator memory (CREMA-D, KS, MVSA at three 224 px frames on one H100).
    device_cache: bool = False
    prefetch: int = 2  # batches each loader worker decodes ahead
    pin_memory: bool = True  # page-locked batches for asynchronous copies (CUDA only)
    # Before each epoch, each shard against the manifest: size (a stat), sha (re-hash), none.
    verify: Literal["size", "sha", "none"] = "size"


@dataclass
class ModelConfig:
    """Encoders, fusion width and the LoRA rank; widths default to the paper's."""

    RANGES: ClassVar[dict[str, Range]] = {
        "width": WIDTH, "encoder_width": Range(1, 1024), "encoder_blocks": Range(1, 64),
        "text_layers": Range(0, 48), "heads": Range(1, 256), "ffn_mult": Range(1, 64)}

    def relation_errors(self, prefix: str) -> list[str]:
        """Attention splits the width evenly over the heads."""
        if self.heads >= 1 and self.width % self.heads:
            return [f"{prefix}width {self.width} must be a multiple of {prefix}heads "
                    f"{self.heads}"]
        return []
    width: int = 512  # model width D (paper: 512 for audio-video)
    encoder_width: int = 64  # channels of the first ResNet stage (ResNet18: 64)
    encoder_blocks: list[int] = field(default_factory=lambda: [2, 2, 2, 2])  # ResNet18
    encoders: dict[str, str] = field(default_factory=dict)  # modality -> encoder name; empty = by kind
    # BERT text encoder: a hub name or a local folder (offline with HF_HUB_OFFLINE=1); with
    # text_layers > 0 a from-scratch BertConfig of that many layers (width `width`) instead.
    text_model: str = "bert-base-uncased"
    text_layers: int = 0
    heads: int = 8
    ffn_mult: int = 4


@dataclass
class OptimConfig:
    """SGD with a step schedule, the paper's settings; every stage restarts it."""

    RANGES: ClassVar[dict[str, Range]] = {
        "epochs": AT_LEAST_ONE, "lr": LEARNING_RATE, "momentum": Range(0, 1, high_open=True),
        "weight_decay": NON_NEGATIVE, "step_size": AT_LEAST_ONE,
        "gamma": Range(0, 1, low_open=True), "grad_clip": NON_NEGATIVE,
        "encoder_lr": LEARNING_RATE}
    epochs: int = 150
    lr: float = 1e-3
    momentum: float = 0.9
    # The paper states 0.1; the published baseline code uses 1e-4.
    weight_decay: float = 0.1
    step_size: int = 70  # lr / 10 every 70 epochs
    gamma: float = 0.1
    grad_clip: float = 0.0  # max gradient norm per update; 0 = off
    encoder_lr: dict[str, float] = field(default_factory=dict)  # modality -> its encoder's lr


# CCAT's settings, MethodConfig fields until they became its Params (method.params): a config
# or a saved run that still has one at the top of ``method`` is refused, naming the new key.
MOVED_TO_PARAMS = ("lambda_reg", "rank", "beta", "temperature", "similarity", "budget",
                   "pretrain_epochs", "pretrain_fraction", "fresh_encoders",
                   "secondary_optimizer", "secondary_forward", "lora_alpha", "lora_scale",
                   "fixed_classifier", "alternating", "secondary", "lora", "fusion_rule")


@dataclass
class MethodConfig:
    """Which method trains, and its hyperparameters: ``params``, checked against the chosen
    method's ``Params`` dataclass (``ccat/methods/<name>.py``), which holds its paper's
    defaults; ``configs/methods/<name>.yaml`` holds what a run differs in from them."""

    MOVED: ClassVar[dict[str, str]] = {key: f"params.{key}" for key in MOVED_TO_PARAMS}
    name: str = "ccat"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    """One training run."""

    # threads: torch.set_num_threads(100000) segfaults; 1024 covers the largest CPUs.
    RANGES: ClassVar[dict[str, Range]] = {"seed": SEED_RANGE, "threads": Range(0, 1024)}

    seed: int = 0
    out: str = "runs/run"
    device: str = "auto"  # auto, cpu or cuda
    # CPU only: deterministic kernels with oneDNN off, so a resumed run ends with exactly the
    # weights of an uninterrupted one. oneDNN's strided 1x1 convolution backward is not
    # deterministic, and with one thread torch 2.14.1's oneDNN corrupted the heap here, so
    # one-thread runs keep oneDNN off either way.
    deterministic: bool = True
    threads: int = 0  # CPU intra-op threads; 0 = torch's default (one per core)
    # torch.compile each encoder with this backend ("inductor" on CUDA); "" = eager.
    compile: str = ""
    # The split that picks best.pt (best fused accuracy on it). "" = data.val_split when the
    # data has it, else the last epoch: the test split is used only when named here.
    select_split: str = ""
    # How best.pt is chosen: "best" = the epoch of the best fused accuracy on the selection
    # split (a tie goes to the later epoch), "last" = the last epoch (the selection split is
    # still evaluated each epoch, for the curves). A resume may not change it.
    select: Literal["best", "last"] = "best"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)


def _check_value(key: str, hint: Any, value: Any) -> Any:
    """Return ``value`` if it fits type ``hint`` (ints widen to float), else raise."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"config key {key!r} must be one of "
                              f"{', '.join(map(str, typing.get_args(hint)))}, got {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (list, dict):
        if not isinstance(value, origin):
            raise ConfigError(f"config key {key!r} must be a {origin.__name__}, got {value!r}")
        args = typing.get_args(hint)
        if origin is list:
            return [_check_value(f"{key}[{i}]", args[0], v) for i, v in enumerate(value)]
        return {_check_value(key, args[0], k): _check_value(f"{key}.{k}", args[1], v)
                for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _check_value(key, arg, value)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r} has the wrong type: {value!r}")
    ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"config key {key!r} must be {hint.__name__}, got {value!r} "
                          f"({type(value).__name__})")
    return value


def merge(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    """Set ``values`` (nested dicts) onto dataclass ``obj`` in place, strictly."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<top>'!r} must be a mapping")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    check_moved(type(obj), values, prefix)
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {prefix + close[0]!r}?" if close else \
                f"known keys here: {sorted(names)}"
            raise ConfigError(f"unknown config key {dotted!r}; {hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            merge(current, value, f"{dotted}.")
        elif isinstance(current, dict) and isinstance(value, dict):  # later layers add keys
            setattr(obj, key, {**current, **_check_value(dotted, hints[key], value)})
        else:
            setattr(obj, key, _check_value(dotted, hints[key], value))


def check_moved(cls: type, values: dict[str, Any], prefix: str) -> None:
    """Refuse keys that moved elsewhere (the dataclass's ``MOVED``), naming the new keys."""
    moved = [key for key in values if key in getattr(cls, "MOVED", {})]
    if moved:
        old = ", ".join(f"{prefix}{key}" for key in moved)
        new = ", ".join(f"{prefix}{cls.MOVED[key]}" for key in moved)
        raise ConfigError(f"{old} {'is' if len(moved) == 1 else 'are'} now {new}: write "
                          f"{'it' if len(moved) == 1 else 'them'} there (a run saved with the "
                          f"old keys cannot be resumed or read; train it again)")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, except that ``1e-3`` and ``5E4`` are floats (YAML 1.2): YAML
    1.1 reads a float only with a dot and a signed exponent, so they would be strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """YAML text as Python values, with scientific notation read as floats."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain values only, no objects


def parse_override(text: str) -> dict[str, Any]:
    """``'optim.lr=0.1'`` -> ``{'optim': {'lr': 0.1}}``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. optim.epochs=10")
    return nest(key.strip(), load_yaml(raw) if raw else "")


METHOD_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "methods"


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file's mapping; a missing or malformed file is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None


def parse_params(cls: type | None, values: Any, method: str) -> Any:
    """``values`` as an instance of ``Params`` dataclass ``cls`` (None when the method has
    none), strictly: a key it lacks, a wrong type or an out-of-range number is a
    ConfigError; the first names the method's params."""
    prefix = "method.params."
    if not isinstance(values, dict):
        raise ConfigError(f"config key 'method.params' must be a mapping, got {values!r}")
    known = [f.name for f in dataclasses.fields(cls)] if cls is not None else []
    unknown = [key for key in values if key not in known]
    if unknown:
        has = f"its params are {', '.join(known)}" if known else "it takes no params"
        raise ConfigError(f"method {method!r} has no param {', '.join(map(repr, unknown))} "
                          f"({', '.join(prefix + k for k in unknown)}); {has}")
    if cls is None:
        return None
    params = cls()
    merge(params, values, prefix)
    check_ranges(params, prefix)
    return params


def range_errors(obj: Any, prefix: str = "") -> list[str]:
    """One sentence per numeric field of dataclass ``obj`` (and the dataclasses in it)
    whose value lies outside its ``RANGES`` entry, list items and dict values each; then
    those of the dataclass's ``relation_errors(prefix)``, when it has one."""
    errors = []
    ranges = getattr(type(obj), "RANGES", {})
    for f in dataclasses.fields(obj):
        value, dotted = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            errors += range_errors(value, f"{dotted}.")
            continue
        if f.name not in ranges:
            continue
        items = (value.items() if isinstance(value, dict) else
                 ((f"[{i}]", v) for i, v in enumerate(value)) if isinstance(value, list) else
                 [("", value)])
        for suffix, item in items:
            name = f"{dotted}.{suffix}" if isinstance(value, dict) else f"{dotted}{suffix}"
            if item not in ranges[f.name]:
                finite = "" if math.isfinite(item) else "a finite number "
                errors.append(f"{name} is {item!r} but must be {finite}{ranges[f.name]}")
    if not errors and hasattr(obj, "relation_errors"):  # checks between fields
        errors += obj.relation_errors(prefix)
    return errors


def check_ranges(obj: Any, prefix: str = "") -> None:
    """Raise a ConfigError naming every out-of-range numeric field of ``obj``."""
    errors = range_errors(obj, prefix)
    if errors:
        raise ConfigError("; ".join(errors) + ".")


def nest(dotted: str, value: Any) -> dict[str, Any]:
    """``('a.b', 1)`` -> ``{'a': {'b': 1}}``."""
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(values: dict[str, Any]) -> RunConfig:
    cfg = RunConfig()
    merge(cfg, values)
    return cfg


# Keys that change how fast a run goes or where it reads and writes, not what it learns:
# ``--resume`` accepts new values for these (data.path and data.cache_dir: the data's
# fingerprint is checked). The batches do not depend on the workers (ccat.data.pipeline);
# threads change the order of float sums, so a resume with new threads continues the same
# run but is no longer bit-identical to it.
RESUME_FREE_KEYS = ("out", "threads", "data.path", "data.cache_dir", "data.workers",
                    "data.prefetch", "data.pin_memory", "data.verify")
UNSET = "(unset)"


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{'a.b': value}`` (an empty dict adds no key)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(saved: RunConfig, new: RunConfig,
                free: tuple[str, ...] = RESUME_FREE_KEYS) -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved value, new value)`` for every key outside ``free`` that differs."""
    old, now = flatten(to_dict(saved)), flatten(to_dict(new))
    return [(k, old.get(k, UNSET), now.get(k, UNSET)) for k in sorted(old.keys() | now.keys())
            if k not in free and old.get(k, UNSET) != now.get(k, UNSET)]


def save_config(cfg: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML (loadable again with :func:`load_config`)."""
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
