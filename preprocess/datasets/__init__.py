"""Dataset recipes, chosen by name: one module of this package adds one recipe with
``@register``; other installed packages add theirs through the ``ccat.recipes`` entry point
group.

A recipe is a dataclass: its init fields, declared with :func:`option`, are the options of
``ccat-data build NAME`` (name, type, default and help text all come from the field), and
its class attributes hold the dataset's facts: ``name``, the class list, the published
split files and how to download them (:class:`Published`), and an optional ``synth``
dataclass whose fields are the options of ``ccat-data synth NAME``.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Protocol

from ccat.errors import UserError
from ccat.registry import Entries, Registry, RegistryError
from preprocess.splits import Entry, SplitError, SplitRow

SPLITS_DIR = "splits"  # where `ccat-data download` puts the published split files, under RAW


class LayoutError(UserError, ValueError):
    """A raw folder is not the layout a recipe expects; the message says what was expected."""


class RecipeError(UserError, ValueError):
    """An unknown recipe name, or a recipe declared wrongly; the message names it."""


class OptionError(UserError, ValueError):
    """An option value out of its range; the message names the option, the value and the
    range or choices."""


@dataclasses.dataclass(frozen=True)
class Range:
    """The closed interval an option's value must lie in. Every bounded option declares
    its range on its field (:func:`option`), so that :func:`check_options` checks them all
    in one place, before a build reads or removes anything."""

    low: float
    high: float

    def __contains__(self, value: object) -> bool:
        """Whether ``value`` is a number (not a bool) in the interval; NaN never is."""
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and self.low <= value <= self.high)

    def __str__(self) -> str:
        return f"{_number(self.low)} to {_number(self.high)}"


# Ranges of the options several recipes share; docs/building.md says why each bound.
SECONDS = Range(0.1, 600.0)  # fixed audio duration: a 600 s float64 STFT is about 0.3 GB
FRAME_SIZE = Range(16, 1024)  # side of a stored frame or image, px
NUM_FRAMES = Range(1, 64)  # 64 frames of 1024 px RGB are 200 MB per clip in memory
SEED = Range(0, 2**32 - 1)
SYNTH_COUNT = Range(1, 5000)  # clips or pairs a synthetic tree holds: tests and demos
SYNTH_STRENGTH = Range(0.0, 10.0)  # a synthetic cue's scale; 1 is the calibrated one
SYNTH_RELIABILITY = Range(0.0, 1.0)  # fraction of synthetic clips whose easy cue is present


@dataclasses.dataclass(frozen=True)
class Published:
    """Where a dataset's published split lists come from and how its media are obtained."""

    lists_url: str  # base URL of the split files ("": they come with the media)
    split_files: dict[str, str]  # split name -> file name, under RAW/splits after a download
    media_by_hand: str = ""  # how to get media that cannot be fetched here ({target}: RAW)
    media_repo: str = ""  # or: a Git LFS repository holding the media in media_folders
    media_folders: tuple[str, ...] = ()
    splits_dir: str = SPLITS_DIR  # where under RAW the split files are (the media's own folder)


@dataclasses.dataclass(frozen=True)
class Option:
    """One command-line option, made from a dataclass field declared with :func:`option`."""

    name: str  # the dataclass keyword
    flag: str  # e.g. --frame-size
    type: Any
    default: Any
    help: str
    range: Range | None = None  # the values allowed, for a numeric option


def option(default: Any, help: str, *, flag: str = "", within: Range | None = None) -> Any:
    """A dataclass field that is a command-line option: its default and help text, the
    flag when it is not ``--<name with dashes>``, and for a number the range it must lie in."""
    return dataclasses.field(default=default,
                             metadata={"help": help, "flag": flag, "range": within})


def options_of(cls: type) -> list[Option]:
    """The options of a recipe or synth dataclass: its init fields, in declaration order."""
    hints = typing.get_type_hints(cls)
    options = []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        if "help" not in field.metadata:
            raise RecipeError(f"{cls.__name__}.{field.name} is an init field without help "
                              "text; declare it with preprocess.datasets.option(default, help)")
        options.append(Option(field.name, field.metadata["flag"] or
                              "--" + field.name.replace("_", "-"), hints[field.name],
                              field.default, field.metadata["help"],
                              field.metadata.get("range")))
    return options


def check_options(values: Any) -> None:
    """Refuse, in one sentence naming the option, its value and its range, the first
    option of the dataclass instance ``values`` outside the range its field declares."""
    for opt in options_of(type(values)):
        value = getattr(values, opt.name)
        if opt.range is not None and value is not None and value not in opt.range:
            shown = _number(value) if isinstance(value, (int, float)) else repr(value)
            raise OptionError(f"{opt.flag} {shown} is out of range: give a value from "
                              f"{opt.range}")


def _number(value: float) -> str:
    """``3``, ``0.5``, ``nan``, ``1e+30``: a number as a user would type it."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() and \
        abs(value) < 1e15 else str(value)


def check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    """Refuse ``value`` of option ``flag`` unless it is one of ``choices``."""
    if value not in choices:
        raise OptionError(f"{flag} {value!r}: choose {' or '.join(choices)}")


class Recipe(Protocol):
    """How one dataset's raw media become samples.

    Recipes are plain picklable objects: the builder sends them to worker processes.
    """

    name: str
    classes: list[str]
    unit: ClassVar[str]  # what one sample is called in summaries: "clips", "pairs"
    published: Published | None  # None: no published splits to download or find
    synth: type | None  # a dataclass with options and write(out, progress) -> summary

    def modalities(self) -> dict[str, dict[str, Any]]:
        """Manifest entry per modality: its kind and every preprocessing parameter."""

    def find(self, raw: Path) -> tuple[dict[str, Entry], list[dict[str, Any]]]:
        """Every sample under ``raw`` by key, and files that cannot be samples at all."""

    def list_files(self, raw: Path) -> dict[str, Path]:
        """Label or class files the recipe reads besides the split files, by role: their
        hashes go into ``sources.split_files`` beside the split files'."""

    def read_split_file(self, path: Path) -> list[SplitRow]:
        """The rows of a published split file, each with its line number."""

    def process(self, raw: Path, entry: Entry) -> tuple[dict[str, bytes], dict[str, Any]]:
        """Encoded modality members of one sample and its provenance for meta.json."""

    # Optional: ``facts() -> dict``, the recipe's choices (class order, fold, ...) that the
    # manifest records under ``sources.recipe``, read after ``find``.


# what a recipe class has besides its init fields (a field, as ``classes`` is, is on instances)
RECIPE_PARTS = ("name", "unit", "published", "synth", "modalities", "find", "list_files",
                "read_split_file", "process")


def is_recipe_class(cls: type) -> bool:
    """Whether ``cls`` can be a recipe: a dataclass with :class:`Recipe`'s parts whose init
    fields are options (:func:`option`), which the recipe's ``ccat-data build`` reads."""
    if not dataclasses.is_dataclass(cls) or not all(hasattr(cls, p) for p in RECIPE_PARTS):
        return False
    try:
        options_of(cls)
    except RecipeError:
        return False
    return True


RECIPES: Registry[Callable[..., Recipe]] = Registry("dataset recipe", "ccat.recipes", Entries(
    "a recipe class (a dataclass with the parts of preprocess.datasets.Recipe, its init "
    "fields declared with preprocess.datasets.option)", is_recipe_class))
register = RECIPES.register  # class decorator adding a recipe under a name, once


def recipe_names() -> list[str]:
    """The registered recipe names, sorted."""
    return RECIPES.names()


def get_recipe(name: str) -> Callable[..., Recipe]:
    """The recipe registered as ``name``; an unknown name is an error naming the known ones."""
    try:
        return RECIPES.get(name)
    except RegistryError as err:
        raise RecipeError(str(err)) from None


@dataclasses.dataclass(frozen=True)
class OwnLists:
    """The split rows a recipe makes itself, for splits no file lists as they are (an
    actor-disjoint rule, a list whose rows name their own split): an optional recipe method
    ``own_lists(raw, found, split_files)`` returns one, or None to read each split file
    with ``read_split_file``. ``skipped`` are samples the rule leaves out, with the split
    and reason; ``record`` goes into the manifest as ``sources.recipe`` (fingerprinted)."""

    rows: dict[str, list[SplitRow]]
    skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    record: dict[str, Any] = dataclasses.field(default_factory=dict)


def own_lists(recipe: Recipe, raw: Path, found: dict[str, Entry],
              split_files: dict[str, Path]) -> OwnLists | None:
    """The recipe's :class:`OwnLists` for this build, or None when it reads split files
    as they are (recipes without an ``own_lists`` method always do)."""
    method = getattr(recipe, "own_lists", None)  # optional: plugin recipes may predate it
    return None if method is None else method(raw, found, split_files)


def published_split_files(recipe: Recipe, raw: Path) -> dict[str, Path]:
    """The recipe's published split files under ``raw/splits`` (where ``ccat-data download``
    puts them; a dataset whose lists come with its media names its own folder), by split;
    none when that folder holds none of them, or when the recipe's options make its own
    splits (``uses_published_splits`` false)."""
    if recipe.published is None or not getattr(recipe, "uses_published_splits", True):
        return {}
    folder = raw / recipe.published.splits_dir
    files = {split: folder / name for split, name in recipe.published.split_files.items()}
    missing = [path.name for path in files.values() if not path.is_file()]
    if len(missing) == len(files):
        return {}
    if missing:
        raise SplitError(f"{folder} lacks {', '.join(missing)} of the published "
                         f"{recipe.name} split files; fetch them again (`ccat-data download "
                         f"{recipe.name}`) or name every split file with --split")
    return files


def iter_published() -> Iterator[tuple[str, Published]]:
    """``(name, published facts)`` of every registered recipe that has them."""
    for name in recipe_names():
        published = get_recipe(name).published
        if published is not None:
            yield name, published


def _load_builtin() -> None:
    """Import every module of this package (the built-in recipes and any file dropped in),
    so their ``@register`` lines have run; done once, when the package is imported."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_load_builtin()
