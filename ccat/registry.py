"""Name -> class registries: one file adds one entry, a duplicate name is an error.

Other installed packages add entries through entry points: a distribution that declares,
say, ``[project.entry-points."ccat.methods"] my_method = "my_pkg.method:MyMethod"`` adds
``MyMethod`` to the method registry under ``my_method``. A registry loads its group's entry
points once, when it is first queried, so a command that needs no registry (``ccat-data
verify``) imports no plugin. A plugin is foreign code: one that fails to import (even by
``sys.exit``), names no class, a class of the wrong kind or a name already taken is skipped
with one warning naming it and its distribution, and everything else keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Generic, TypeVar

from ccat.errors import UserError
from ccat.ui import make_console

T = TypeVar("T")
BUILTIN = "builtin"  # the source of the entries this project registers itself
SHOWN_CHARS = 200  # the most of a plugin's error or value a warning repeats


class RegistryError(UserError, KeyError):
    """An unknown name was asked for, or a name was registered twice."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Entries:
    """What a registry's entries are: classes that ``fits`` accepts, named ``text`` in the
    warning for a plugin whose class does not fit."""

    text: str
    fits: Callable[[type], bool]


def subclasses_of(base: type) -> Entries:
    """Entries that are subclasses of ``base``."""
    return Entries(f"a subclass of {base.__module__}.{base.__qualname__}",
                   lambda cls: issubclass(cls, base))


ANY_CLASS = Entries("a class", lambda cls: True)


def _source(entry_point: metadata.EntryPoint) -> str:
    """'name version' of the distribution that declares ``entry_point``."""
    dist = entry_point.dist
    if dist is None:
        return "an unknown distribution"
    return f"{dist.metadata['Name']} {dist.version}"


def _shown(text: str) -> str:
    """``text`` on one line and at most SHOWN_CHARS long: a plugin's words, quoted safely."""
    line = " ".join(text.split())
    return line if len(line) <= SHOWN_CHARS else line[:SHOWN_CHARS] + "..."


class Registry(Generic[T]):
    """A named collection of classes (encoders, fusions, methods, recipes) of the kind
    ``entries`` says, with the entries of entry point group ``group`` (none if empty) added
    on first query."""

    def __init__(self, kind: str, group: str = "", entries: Entries = ANY_CLASS):
        self.kind, self.group, self.entries = kind, group, entries
        self._entries: dict[str, T] = {}
        self._sources: dict[str, str] = {}  # name -> BUILTIN or the distribution's 'name version'
        self._plugins_loaded = not group

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding the decorated class under ``name``."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise RegistryError(f"{self.kind} {name!r} is registered twice")
            if not (isinstance(obj, type) and self.entries.fits(obj)):
                raise RegistryError(f"{self.kind} {name!r} is {obj!r}, not {self.entries.text}")
            self._entries[name], self._sources[name] = obj, BUILTIN
            return obj

        return add

    def get(self, name: str) -> T:
        self._load_plugins()
        if name not in self._entries:
            raise RegistryError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._entries)

    def sources(self) -> dict[str, str]:
        """Every name, sorted, with where it comes from: 'builtin' or 'distribution version'."""
        self._load_plugins()
        return {name: self._sources[name] for name in sorted(self._entries)}

    def _load_plugins(self) -> None:
        """Add every entry point of ``group`` that loads and fits, once; warn of each other."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True  # a plugin that queries this registry while loading
        for entry_point in metadata.entry_points(group=self.group):
            obj, problem = self._load(entry_point)
            if problem:
                dist = entry_point.dist.metadata["Name"] if entry_point.dist else "it"
                make_console(stderr=True).print(
                    f"warning: plugin {_source(entry_point)} skipped ({self.group} entry point "
                    f"{entry_point.name} = {entry_point.value}): {problem}; fix or uninstall "
                    f"{dist}", markup=False, highlight=False, soft_wrap=True)
            else:
                self._entries[entry_point.name] = obj
                self._sources[entry_point.name] = _source(entry_point)

    def _load(self, entry_point: metadata.EntryPoint) -> tuple[Any, str]:
        """The class ``entry_point`` names, or None and why it cannot be an entry."""
        name = entry_point.name
        if name in self._sources:
            return None, (f"{self.kind} {name!r} is already registered by "
                          f"{self._sources[name]}, so the entry point needs another name")
        try:
            obj = entry_point.load()
        # any failure of foreign code at import is the plugin's, sys.exit() included; Ctrl-C
        # (KeyboardInterrupt) is the user's and still stops the command
        except (Exception, SystemExit) as err:  # noqa: BLE001
            return None, f"it failed to import ({type(err).__name__}: {_shown(str(err))})"
        if not isinstance(obj, type):
            return None, f"it names {_shown(repr(obj))}, not a class"
        try:
            fits = self.entries.fits(obj)
        except Exception:  # noqa: BLE001 - a check that trips on the class: it does not fit
            fits = False
        if not fits:
            return None, (f"it names {_shown(obj.__module__ + '.' + obj.__qualname__)}, not "
                          f"{self.entries.text}")
        return obj, ""
