"""Typed run configuration: dataclasses with the paper's defaults, strict YAML, overrides.

A run's config is layered: the dataclass defaults, then a YAML file, then ``--set
key=value`` overrides. Loading is strict, and pydantic v2 does the checking (:func:`schema`):
an unknown key, a value of the wrong type or a number outside its field's range (each
dataclass's ``RANGES``) is a :class:`ConfigError` naming the dotted key. Numbers in
scientific notation (``1e-3``) are floats, as in YAML 1.2.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.resources
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import annotated_types
import pydantic
import yaml

from ccat.errors import UserError
from ccat.fileio import write_text


class ConfigError(UserError, ValueError):
    """A config file or override names an unknown key or gives a value of the wrong type."""


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric field: finite, from ``low`` (excluded if ``low_open``)
    to ``high`` (excluded if ``high_open``). Both ends are required: a knob without an upper
    end lets a typo (``threads=100000``, ``frame_size=100000``) crash or exhaust memory.
    pydantic checks it (:func:`schema`), as the bounds :meth:`interval` gives."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def interval(self) -> annotated_types.Interval:
        """The range as pydantic's ``ge``/``gt`` and ``le``/``lt`` constraints."""
        return annotated_types.Interval(
            gt=self.low if self.low_open else None, ge=None if self.low_open else self.low,
            lt=self.high if self.high_open else None, le=None if self.high_open else self.high)

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


# The optimizers and schedules a run can name (all torch.optim's), and the settings that are
# each one's own: a setting of one the run does not use is refused, naming it. A layer that
# names another optimizer (or schedule) than the layers before it starts that one's settings
# afresh, so `--set optim.name=adam` over configs/cremad.yaml (which sets momentum) is Adam
# with Adam's defaults, while momentum given in the same layer as, or after, adam is refused.
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("step", "cosine", "constant")
OWN_SETTINGS: dict[str, dict[str, Any]] = {  # name -> {setting: its default}
    "sgd": {"momentum": 0.9, "nesterov": False},
    "adam": {"betas": [0.9, 0.999], "eps": 1e-8},  # torch.optim.Adam's defaults
    "adamw": {"betas": [0.9, 0.999], "eps": 1e-8},
    "step": {"step_size": 70, "gamma": 0.1},
    "cosine": {"t_max": 0, "eta_min": 0.0},
    "constant": {}}


@dataclass
class OptimConfig:
    """The optimizer and its schedule (default: SGD with a step schedule, the paper's
    settings); every stage restarts both. ``lr``, ``weight_decay``, ``epochs``,
    ``grad_clip`` and ``encoder_lr`` apply to every optimizer; the rest are one optimizer's
    or one schedule's own (``OWN_SETTINGS``): None = not given, filled with that one's
    default by :meth:`resolve` when it is the chosen one. SGD's and the step schedule's
    default to their values, so that the defaults read as before these choices existed."""

    RANGES: ClassVar[dict[str, Range]] = {
        "epochs": AT_LEAST_ONE, "lr": LEARNING_RATE, "momentum": Range(0, 1, high_open=True),
        "weight_decay": NON_NEGATIVE, "step_size": AT_LEAST_ONE,
        "gamma": Range(0, 1, low_open=True), "grad_clip": NON_NEGATIVE,
        "encoder_lr": LEARNING_RATE, "betas": Range(0, 1, high_open=True),
        "eps": Range(0, 1, low_open=True), "t_max": NON_NEGATIVE, "eta_min": Range(0, 10)}
    # Fields in the order of the runs saved before name and schedule existed, new ones last.
    epochs: int = 150
    lr: float = 1e-3
    momentum: float | None = 0.9  # sgd's own
    # The paper states 0.1; the published baseline code uses 1e-4. Adam adds it to the
    # gradient (L2), AdamW decays the weights directly (decoupled), as torch.optim does.
    weight_decay: float = 0.1
    step_size: int | None = 70  # schedule step's own: lr * gamma every step_size epochs
    gamma: float | None = 0.1  # step's own (lr / 10 every 70 epochs)
    grad_clip: float = 0.0  # max gradient norm per update; 0 = off
    encoder_lr: dict[str, float] = field(default_factory=dict)  # modality -> its encoder's lr
    name: Literal["sgd", "adam", "adamw"] = "sgd"  # torch.optim.SGD, Adam or AdamW
    schedule: Literal["step", "cosine", "constant"] = "step"  # stepped once per epoch
    nesterov: bool | None = False  # sgd's own
    betas: list[float] | None = None  # adam's and adamw's own ([0.9, 0.999], torch's)
    eps: float | None = None  # adam's and adamw's own (1e-8, torch's)
    # schedule cosine's own: cosine annealing from lr to eta_min over t_max epochs (0 = the
    # stage's epochs; past t_max it rises again, as torch's CosineAnnealingLR does)
    t_max: int | None = None
    eta_min: float | None = None

    def before_merge(self, values: dict[str, Any]) -> None:
        """A layer naming another optimizer or schedule starts its settings afresh: the
        previous one's own settings, given by earlier layers, are dropped."""
        for key, names in (("name", OPTIMIZERS), ("schedule", SCHEDULES)):
            chosen = values.get(key, getattr(self, key))
            if chosen != getattr(self, key) and chosen in names:
                for setting in OWN_SETTINGS[getattr(self, key)]:
                    setattr(self, setting, None)

    def resolve(self, prefix: str = "optim.") -> None:
        """Fill the chosen optimizer's and schedule's own settings that are not given with
        their defaults; refuse, in one sentence, a setting of one that is not chosen."""
        for key, names in (("name", OPTIMIZERS), ("schedule", SCHEDULES)):
            chosen = getattr(self, key)
            for other in names:
                for setting in sorted(set(OWN_SETTINGS[other]) - set(OWN_SETTINGS[chosen])):
                    if getattr(self, setting) is not None:
                        raise ConfigError(
                            f"{prefix}{setting} is a setting of {prefix}{key}={other}, but "
                            f"{prefix}{key} is {chosen}; remove {prefix}{setting} (or set it "
                            f"to null) or set {prefix}{key}={other}")
            for setting, default in OWN_SETTINGS[chosen].items():
                if getattr(self, setting) is None:
                    setattr(self, setting, list(default) if isinstance(default, list)
                            else default)

    def relation_errors(self, prefix: str) -> list[str]:
        """Adam's two betas; Nesterov needs momentum (torch.optim.SGD refuses it without)."""
        if self.betas is not None and len(self.betas) != 2:
            return [f"{prefix}betas is {shown(self.betas)} but must be two numbers, "
                    f"[beta1, beta2]"]
        if self.nesterov and not self.momentum:
            return [f"{prefix}nesterov is true but {prefix}momentum is "
                    f"{shown(self.momentum)}; Nesterov momentum needs a momentum above 0"]
        return []


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
    defaults; ``ccat/configs/methods/<name>.yaml`` holds what a run differs in from them."""

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
    # Whose training settings: "shared" = this config's optimizer, schedule, batch and epochs
    # for every method; "released" = the method's authors' code's for the run's dataset, the
    # ``released.<dataset>`` layer of ccat/configs/methods/<name>.yaml over this config (see
    # :func:`ccat.run_config.load_config`). A run saved before the key existed is "shared".
    protocol: Literal["shared", "released"] = "shared"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)


# Validation. Each config dataclass (and each method's Params) is checked by pydantic v2
# against a strict model built once from its fields: the field types, with the dataclass's
# RANGES as pydantic's ge/gt/le/lt constraints on each number (a list's items and a dict's
# values each), non-finite floats refused and an unknown key refused (extra="forbid").
# Strict: 3.0 is not an int, '3' not a number, true not 1; an int where a float is wanted is
# that float, as YAML 1.2 reads JSON's numbers. The dataclasses stay plain dataclasses (the
# method files' Params included): pydantic's strict mode takes only instances for a
# dataclass, so the model mirrors it. Every error becomes one sentence naming the dotted key
# (:func:`_sentence`); ranges are declared once (RANGES) and checked once (:func:`validated`).
STRICT = pydantic.ConfigDict(strict=True, extra="forbid", allow_inf_nan=False,
                             protected_namespaces=())
RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal",
                "finite_number"}


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    """The type hints of dataclass ``cls``, evaluated once (its annotations are strings, and
    evaluating them is most of the time a merge would otherwise take)."""
    return typing.get_type_hints(cls)


@functools.cache
def schema(cls: type) -> type[pydantic.BaseModel]:
    """The strict pydantic model of dataclass ``cls``: its fields, their types (a nested
    dataclass as its own model) and its RANGES; every field required (values are always
    given whole, defaults filled from an instance)."""
    ranges = getattr(cls, "RANGES", {})
    return pydantic.create_model(
        f"{cls.__qualname__}Schema", __config__=STRICT,
        **{f.name: (_constrained(hints(cls)[f.name], ranges.get(f.name)), ...)
           for f in dataclasses.fields(cls)})


def _constrained(hint: Any, limit: Range | None) -> Any:
    """Type ``hint`` for pydantic: ``limit`` on its numbers (a list's items, a dict's values;
    None passes), a dataclass as its :func:`schema`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_constrained(arg, limit) for arg in args)]
    if origin is list:
        return list[_constrained(args[0], limit)]
    if origin is dict:
        return dict[args[0], _constrained(args[1], limit)]
    if dataclasses.is_dataclass(hint):
        return schema(hint)
    if limit is not None and hint in (int, float):
        return typing.Annotated[hint, limit.interval()]
    return hint


def validated(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """An instance of dataclass ``cls`` from ``values`` (every field, nested dataclasses as
    dicts), validated by :func:`schema`; an invalid value is a ConfigError naming its key
    (prefixed ``prefix``)."""
    try:
        checked = schema(cls).model_validate(values)
    except pydantic.ValidationError as err:
        raise ConfigError(_sentence(cls, err.errors(include_url=False), prefix)) from None
    return _instance(cls, checked.model_dump())


def _instance(cls: type, values: dict[str, Any]) -> Any:
    """Dataclass ``cls`` (and the dataclasses in it) from validated ``values``."""
    return cls(**{key: _instance(hints(cls)[key], value)
                  if dataclasses.is_dataclass(hints(cls)[key]) else value
                  for key, value in values.items()})


def _sentence(cls: type, errors: list[Any], prefix: str) -> str:
    """pydantic's errors as one sentence: the first that is not a range's (an unknown key
    first), else every range's, joined."""
    others = sorted((e for e in errors if e["type"] not in RANGE_ERRORS),
                    key=lambda e: e["type"] != "extra_forbidden")
    if others:
        return _said(cls, others[0], prefix)
    return "; ".join(_said(cls, e, prefix) for e in errors) + "."


def _said(cls: type, error: Any, prefix: str) -> str:
    """One pydantic error as the clause a user reads, naming the dotted key."""
    key, hint, owner, name = _located(cls, error["loc"], prefix)
    value, kind = error["input"], error["type"]
    if kind == "extra_forbidden":
        names = [f.name for f in dataclasses.fields(owner)]
        here = key.rpartition(".")[0] + "." if "." in key else ""
        close = difflib.get_close_matches(name, names, n=1)
        return f"unknown config key {shown(key)}; " + (
            f"did you mean {here + close[0]!r}?" if close else f"known keys here: {sorted(names)}")
    if kind in RANGE_ERRORS:
        if hint is float and type(value) is int:
            value = float(value)  # as it would be read (pydantic echoes the input)
        finite = "a finite number " if kind == "finite_number" else ""
        return f"{clipped(key)} is {shown(value)} but must be {finite}{owner.RANGES[name]}"
    if typing.get_origin(hint) is Literal:
        return (f"config key {shown(key)} must be one of "
                f"{', '.join(map(str, typing.get_args(hint)))}, got {shown(value)}")
    if typing.get_origin(hint) in (list, dict):
        return (f"config key {shown(key)} must be a {typing.get_origin(hint).__name__}, "
                f"got {shown(value)}")
    if isinstance(hint, type):
        return (f"config key {shown(key)} must be {hint.__name__}, got {shown(value)} "
                f"({type(value).__name__})")
    return f"config key {shown(key)} has the wrong type: {shown(value)}"


def _located(cls: type, loc: tuple[Any, ...], prefix: str) -> tuple[str, Any, type, str]:
    """Where pydantic's ``loc`` points in dataclass ``cls``: the dotted key, the type hint
    there (its None dropped), and the dataclass and field name that hold it."""
    key, hint, owner, name = prefix.rstrip("."), cls, cls, ""
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
            hint, args = args[0], list(typing.get_args(args[0]))
        if dataclasses.is_dataclass(hint):
            owner, name = hint, str(part)
            hint = hints(hint).get(name)
            key = f"{key}.{name}" if key else name
        elif typing.get_origin(hint) is list:
            hint, key = args[0], f"{key}[{part}]"
        elif typing.get_origin(hint) is dict:
            is_key = bool(parts) and parts[0] == "[key]"
            hint = args[0] if is_key else args[1]
            parts = parts[1:] if is_key else parts
            key = key if is_key else f"{key}.{part}"
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    return key, hint, owner, name


def merge(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    """Set ``values`` (one layer: nested dicts) onto dataclass ``obj`` in place, strictly
    (:func:`validated`): a section merges key by key, a dict field gains the layer's keys,
    any other value is replaced."""
    new = validated(type(obj), _layered(obj, values, prefix), prefix)
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, getattr(new, f.name))


def _layered(obj: Any, values: Any, prefix: str) -> dict[str, Any]:
    """Dataclass ``obj`` as nested dicts with layer ``values`` over it, not yet validated."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section {shown(prefix.rstrip('.') or '<top>')} must be a "
                          f"mapping, got {shown(values)}")
    check_moved(type(obj), values, prefix)
    if hasattr(obj, "before_merge"):
        obj.before_merge(values)
    layered = dataclasses.asdict(obj)
    for key, value in values.items():
        current = getattr(obj, key, None) if key in layered else None
        if dataclasses.is_dataclass(current):
            layered[key] = _layered(current, value, f"{prefix}{key}.")
        elif isinstance(current, dict) and isinstance(value, dict):  # later layers add keys
            layered[key] = {**current, **value}
        else:
            layered[key] = value
    return layered


def check_moved(cls: type, values: dict[str, Any], prefix: str) -> None:
    """Refuse keys that moved elsewhere (the dataclass's ``MOVED``), naming the new keys."""
    moved = [key for key in values if key in getattr(cls, "MOVED", {})]
    if moved:
        old = ", ".join(f"{prefix}{key}" for key in moved)
        new = ", ".join(f"{prefix}{cls.MOVED[key]}" for key in moved)
        raise ConfigError(f"{old} {'is' if len(moved) == 1 else 'are'} now {new}: write "
                          f"{'it' if len(moved) == 1 else 'them'} there (a run saved with the "
                          f"old keys cannot be resumed or read; train it again)")


# YAML, read strictly and within bounds: every limit below is checked while PyYAML composes
# the nodes, before a Python value is built, so no file or --set value can make a large one.
# A config holds a few hundred bytes; a MiB is room for any, as a file and as the text it
# would be with every alias written out (a 400-byte billion-laughs file would be gigabytes).
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_DEPTH = 20  # nesting levels; the schema nests four (method.params.NAME.KEY)
MAX_NUMBER_CHARS = 40  # a number longer than this is a paste or a typo, not a setting
SHOWN_CHARS = 80  # of a value echoed in a message
_REPR = reprlib.Repr()  # a repr that stops early: a huge nested value is never walked whole
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 3, 8, 8
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = SHOWN_CHARS


def clipped(text: str) -> str:
    """``text`` cut to SHOWN_CHARS characters, an ellipsis marking the cut."""
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 1] + "…"


def shown(value: Any) -> str:
    """``value`` as every config error echoes it: a repr of at most SHOWN_CHARS
    characters, so a huge value can make neither a huge message nor a long wait."""
    return clipped(_REPR.repr(value))


_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_TAG = "tag:yaml.org,2002:"
NUMBERS = {_TAG + "bool", _TAG + "int", _TAG + "float"}


class _Resolver(yaml.resolver.BaseResolver):
    """YAML 1.2's core schema (what JSON reads as numbers, plus ``.inf``, ``.nan``, ``0o``
    and ``0x``): unlike PyYAML's YAML 1.1 rules, ``012`` is not octal, ``1:30`` not base
    60, ``1_0`` not ten, ``yes`` and ``on`` not booleans, and ``1e-3`` is a float."""


for _name, _pattern, _first in (
        ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
        ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
        ("int", _INT.pattern, "-+0123456789"),
        ("float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                  r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+0123456789.")):
    _Resolver.add_implicit_resolver(_TAG + _name, re.compile(_pattern), list(_first))


class _Constructor(yaml.constructor.SafeConstructor):
    """PyYAML's safe constructor (plain values only, no objects) with YAML 1.2's integers."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = self.construct_scalar(node)  # matches _INT: tags are refused while composing
        base = {"0o": 8, "0x": 16}.get(text[:2], 10)
        return int(text[2:] if base != 10 else text, base)


_Constructor.add_constructor(_TAG + "int", _Constructor.construct_yaml_int)
_YAML11 = yaml.resolver.Resolver()  # PyYAML's YAML 1.1 reading, to find where they differ
_BUILD11, _BUILD12, _RESOLVE12 = yaml.constructor.SafeConstructor(), _Constructor(), _Resolver()
_HINTS = (("_", "write numbers without '_'"), (":", "write the number in decimal, not base 60"),
          ("0b", "write integers in decimal"))


def _scalar(builder: yaml.constructor.SafeConstructor, tag: str, text: str) -> Any:
    """The value ``builder`` makes of a scalar ``text`` tagged ``tag`` (``text`` for a tag
    it has no constructor for)."""
    construct = builder.yaml_constructors.get(tag)
    return text if construct is None else construct(builder, yaml.ScalarNode(tag, text))


def plain_problem(text: str) -> str | None:
    """Why plain scalar ``text`` is refused: a number too long to be a setting, or a number
    or boolean that YAML 1.1 reads otherwise than YAML 1.2 (None: it is read as 1.2 reads it)."""
    old_tag = _YAML11.resolve(yaml.ScalarNode, text, (True, False))
    new_tag = _RESOLVE12.resolve(yaml.ScalarNode, text, (True, False))
    if {old_tag, new_tag} & NUMBERS and len(text) > MAX_NUMBER_CHARS:
        return f"is a number of {len(text)} characters; write at most {MAX_NUMBER_CHARS}"
    leading_zero = new_tag == _TAG + "int" and re.match(r"^[-+]?0[0-9]", text)
    if old_tag not in NUMBERS:
        return ("has a leading zero (YAML 1.1 reads such integers as octal); write integers "
                "in decimal without leading zeros") if leading_zero else None
    old, new = _scalar(_BUILD11, old_tag, text), _scalar(_BUILD12, new_tag, text)
    if type(old) is type(new) and (old == new or (old != old and new != new)):  # nan
        return None
    hint = next((fix for mark, fix in _HINTS if mark in text),
                "write integers in decimal without leading zeros" if leading_zero else
                "write true or false, or quote text")
    return f"is ambiguous: YAML 1.1 reads {shown(old)}, YAML 1.2 reads {shown(new)}; {hint}"


class _Refused(Exception):
    """A YAML text refused while composing: ``problem`` (a sentence without its place) at
    ``mark``."""

    def __init__(self, problem: str, mark: yaml.Mark) -> None:
        super().__init__(problem)
        self.problem, self.mark = problem, mark


_KEY, _ROOT = object(), object()  # path entries: composing a mapping key; the document


class _Loader(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser,
              yaml.composer.Composer, _Constructor, _Resolver):
    """One YAML document read as YAML 1.2's core schema with PyYAML's safe constructor,
    refusing while composing, before any Python value exists: nesting past MAX_YAML_DEPTH,
    a tag, a key given twice in one mapping, a plain scalar YAML 1.1 reads otherwise, an
    alias inside its own anchor, and a value larger than MAX_CONFIG_BYTES with its aliases
    written out."""

    def __init__(self, text: str, prefix: str) -> None:
        yaml.reader.Reader.__init__(self, text)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        _Constructor.__init__(self)
        _Resolver.__init__(self)
        self._path: list[Any] = [prefix] if prefix else []
        self._sizes: dict[int, int] = {}  # id of a composed collection -> its expanded size

    def _dotted(self, last: str | None = None) -> str:
        """The dotted name of the node being composed (of its key ``last``, if given)."""
        parts = [p for p in self._path if p is not _KEY and p is not _ROOT]
        name = "".join(p if p.startswith("[") else f".{p}" for p in parts + [last] * bool(last))
        return clipped(name.lstrip("."))

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._path.append(_ROOT if parent is None else _KEY if index is None else
                          f"[{index}]" if isinstance(index, int) else
                          index.value if isinstance(index, yaml.ScalarNode) else "?")
        try:
            event = self.peek_event()
            self._refuse_event(event)
            node = super().compose_node(parent, index)
            if not isinstance(node, yaml.ScalarNode):
                self._measure(node, isinstance(event, yaml.AliasEvent), event.start_mark)
            return node
        finally:
            self._path.pop()

    def _refuse_event(self, event: yaml.Event) -> None:
        """Refuse the node ``event`` starts if it nests too deep, has a tag (``!!float``,
        ``!!set``, ``!name``: a config holds plain values) or is a plain scalar that YAML 1.1
        reads otherwise (:func:`plain_problem`)."""
        name = self._dotted()
        if len(self._path) > MAX_YAML_DEPTH:
            raise _Refused(f"{name} nests deeper than {MAX_YAML_DEPTH} levels; a config "
                           f"nests at most five", event.start_mark)
        if getattr(event, "tag", None) is not None:
            raise _Refused(f"{name or 'the document'} has the tag "
                           f"{clipped(event.tag.replace(_TAG, '!!'))}; a config holds plain "
                           f"values (quote a string instead)", event.start_mark)
        problem = (plain_problem(event.value) if isinstance(event, yaml.ScalarEvent)
                   and event.implicit[0] else None)
        if problem:
            text = clipped(event.value)
            subject = (f"the key {text}{' in ' + name if name else ''}"
                       if self._path[-1] is _KEY else f"{name}={text}" if name else text)
            raise _Refused(f"{subject} {problem}", event.start_mark)

    def _measure(self, node: yaml.CollectionNode, alias: bool, mark: yaml.Mark) -> None:
        """Record the characters ``node`` would take with its aliases written out, refusing
        more than MAX_CONFIG_BYTES; an alias counts its anchor's recorded size, so nothing
        is expanded to measure it."""
        if alias:
            if id(node) not in self._sizes:
                raise _Refused(f"{self._dotted() or 'the document'} holds an alias inside "
                               f"its own anchor, an endless value; write it out", mark)
            return
        children = (node.value if isinstance(node, yaml.SequenceNode) else
                    [child for pair in node.value for child in pair])
        size = 2 + sum(len(child.value) + 2 if isinstance(child, yaml.ScalarNode) else
                       self._sizes[id(child)] for child in children)
        if size > MAX_CONFIG_BYTES:
            raise _Refused(f"{self._dotted() or 'the document'} would be larger than "
                           f"{MAX_CONFIG_BYTES >> 20} MiB with its aliases written out; a "
                           f"config is far smaller, so write it without the aliases", mark)
        self._sizes[id(node)] = size
        if isinstance(node, yaml.MappingNode):
            self._refuse_repeats(node)

    def _refuse_repeats(self, node: yaml.MappingNode) -> None:
        """Refuse a key given twice (YAML would keep the last silently)."""
        seen: dict[Any, int] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode):
                continue  # a list or mapping as a key: the constructor refuses it
            value = _scalar(_BUILD12, key.tag, key.value)  # a plain key or a quoted string
            line = key.start_mark.line + 1
            if value in seen:
                raise _Refused(f"{self._dotted(clipped(key.value))} is given twice (first on "
                               f"line {seen[value]}); keep one", key.start_mark)
            seen[value] = line


def load_yaml(text: str, where: str = "YAML text", prefix: str = "",
              lines: bool = True) -> Any:
    """YAML text as Python values, read as YAML 1.2 within the bounds of :class:`_Loader`;
    a refusal or a syntax error is a ConfigError naming ``where`` (and the line, if
    ``lines``). ``prefix``: the dotted key the text is the value of, for messages."""
    loader = None
    try:
        loader = _Loader(text, prefix)
        return loader.get_single_data()
    except _Refused as err:
        at = f", line {err.mark.line + 1}" if lines else ""
        raise ConfigError(f"{err.problem} ({where}{at}).") from None
    except yaml.reader.ReaderError as err:
        line = text.count("\n", 0, err.position) + 1
        raise ConfigError(f"{where}{f' line {line}' * lines} holds the control character "
                          f"#x{err.character:04x}, so it is not YAML text") from None
    except yaml.MarkedYAMLError as err:
        problem = clipped(", ".join(part for part in (err.context, err.problem) if part))
        at = err.problem_mark if lines else None
        raise ConfigError(f"{where} is not valid YAML: {problem}" + (
            f" (line {at.line + 1}, column {at.column + 1})" if at else "")) from None
    finally:
        if loader is not None:
            loader.dispose()


def parse_override(text: str) -> dict[str, Any]:
    """``'optim.lr=0.1'`` -> ``{'optim': {'lr': 0.1}}``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {shown(text)} must look like key=value, e.g. "
                          f"optim.epochs=10")
    key = key.strip()
    return nest(key, load_yaml(raw, f"--set {clipped(key)}", key, lines=False) if raw else "")


# Each method's settings (its paper's values where they differ from its Params, and the
# release's per dataset): package data, so that an installed wheel reads the same files.
METHOD_CONFIGS = Path(str(importlib.resources.files("ccat") / "configs" / "methods"))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file's mapping of settings; anything else is a ConfigError."""
    path = Path(path)
    where = f"config file {path}"
    values = load_yaml(_config_text(path), where)
    if values is None:  # empty or only comments: no settings, every default (as before)
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where} holds a {type(values).__name__} at its top; a config is "
                          f"a mapping of settings (key: value lines), e.g. configs/demo.yaml")
    return values


def _config_text(path: Path) -> str:
    """The text of config file ``path``: an existing regular file of UTF-8 text of at most
    MAX_CONFIG_BYTES (read no further, so /dev/zero or a dataset cannot be loaded)."""
    where = f"config file {path}"
    if not path.exists():
        raise ConfigError(f"{where} does not exist")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise ConfigError(f"{where} is {kind}; pass a YAML file such as configs/demo.yaml")
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{where} cannot be read ({err.strerror})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where} is larger than {MAX_CONFIG_BYTES >> 20} MiB, so it is not "
                          f"a config (those hold a few settings)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                          f"{err.start}); a config is YAML saved as UTF-8") from None


def parse_params(cls: type | None, values: Any, method: str) -> Any:
    """``values`` as an instance of ``Params`` dataclass ``cls`` (None when the method has
    none), strictly: a key it lacks, a wrong type or an out-of-range number is a
    ConfigError; the first names the method's params."""
    prefix = "method.params."
    if not isinstance(values, dict):
        raise ConfigError(f"config key 'method.params' must be a mapping, got {shown(values)}")
    known = [f.name for f in dataclasses.fields(cls)] if cls is not None else []
    unknown = [key for key in values if key not in known]
    if unknown:
        has = f"its params are {', '.join(known)}" if known else "it takes no params"
        raise ConfigError(f"method {shown(method)} has no param {', '.join(map(shown, unknown))} "
                          f"({', '.join(clipped(prefix + str(k)) for k in unknown)}); {has}")
    if cls is None:
        return None
    params = cls()
    merge(params, values, prefix)  # types and ranges
    check_relations(params, prefix)
    return params


def relation_errors(obj: Any, prefix: str = "") -> list[str]:
    """The sentences of dataclass ``obj``'s ``relation_errors(prefix)`` (checks between its
    fields), and those of the dataclasses in it."""
    errors = obj.relation_errors(prefix) if hasattr(obj, "relation_errors") else []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            errors += relation_errors(value, f"{prefix}{f.name}.")
    return errors


def check_ranges(obj: Any, prefix: str = "") -> None:
    """Check dataclass ``obj`` whole: every field against its :func:`schema` (types and
    ranges), then the relations between fields; the first problem is a ConfigError."""
    validated(type(obj), dataclasses.asdict(obj), prefix)
    check_relations(obj, prefix)


def check_relations(obj: Any, prefix: str = "") -> None:
    """Raise a ConfigError naming every broken relation between fields of ``obj``."""
    errors = relation_errors(obj, prefix)
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
    """A config from nested values (a saved run's included), its optimizer's and schedule's
    own settings resolved: a run saved before ``optim.name`` and ``optim.schedule`` existed
    reads as SGD with a step schedule, which is what it trained with."""
    cfg = RunConfig()
    merge(cfg, values)
    cfg.optim.resolve()
    return cfg


# Keys that change how fast a run goes or where it reads and writes, not what it learns:
# ``--resume`` accepts new values for these (data.path and data.cache_dir: the data's
# fingerprint is checked). The batches do not depend on the workers (ccat.data.pipeline);
# threads change the order of float sums, so a resume with new threads continues the same
# run but is no longer bit-identical to it.
RESUME_FREE_KEYS = ("out", "threads", "data.path", "data.cache_dir", "data.workers",
                    "data.prefetch", "data.pin_memory", "data.verify")
UNSET = "(unset)"
# Method params added after runs were saved without them, by (method, param): the value
# that does what the code before the param did, so a run saved then reads as having it.
# Exact by construction: add an entry only with the value that reproduces the old code.
ADDED_PARAMS: dict[tuple[str, str], Any] = {
    ("ogm_ge", "variant"): "paper",  # 2026-12-08: "released" added; before, always "paper"
    ("opg", "variant"): "paper",
}


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
    """``(dotted key, saved value, new value)`` for every key outside ``free`` that differs;
    a param of :data:`ADDED_PARAMS` that ``saved`` lacks counts as its listed value."""
    old, now = flatten(to_dict(saved)), flatten(to_dict(new))
    for (method, param), value in ADDED_PARAMS.items():
        if saved.method.name == method:
            old.setdefault(f"method.params.{param}", value)
    return [(k, old.get(k, UNSET), now.get(k, UNSET)) for k in sorted(old.keys() | now.keys())
            if k not in free and old.get(k, UNSET) != now.get(k, UNSET)]


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper, quoting every string that YAML 1.1 or 1.2 would read as
    something else (``'0o17'`` and ``'1e3'`` as well as ``'012'`` and ``'yes'``), so that
    :func:`load_yaml` reads each saved value back as it was."""


for _tag, _regexps in _Resolver.yaml_implicit_resolvers.items():
    for _resolved, _regexp in _regexps:
        _Dumper.add_implicit_resolver(_resolved, _regexp, [_tag])


def save_config(cfg: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML, atomically (loadable again with
    :func:`ccat.run_config.load_config`)."""
    write_text(path, yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False))
