"""Name -> constructor registries: one file adds one entry, a duplicate name is an error.

Other installed packages add entries through entry points: a distribution that declares,
say, ``[project.entry-points."ccat.methods"] my_method = "my_pkg.method:MyMethod"`` adds
``MyMethod`` to the method registry under ``my_method``. A registry loads its group's entry
points once, when it is first queried; a plugin that fails to import or registers a name
already taken is one :class:`RegistryError` naming the distribution and the entry point.
"""

from __future__ import annotations

from importlib import metadata
from typing import Callable, Generic, TypeVar

from ccat.errors import UserError

T = TypeVar("T")
BUILTIN = "builtin"  # the source of the entries this project registers itself


class RegistryError(UserError, KeyError):
    """An unknown name was asked for, a name was registered twice, or a plugin failed."""

    def __str__(self) -> str:
        return str(self.args[0])


def _source(entry_point: metadata.EntryPoint) -> str:
    """'name version' of the distribution that declares ``entry_point``."""
    dist = entry_point.dist
    if dist is None:
        return "an unknown distribution"
    return f"{dist.metadata['Name']} {dist.version}"


class Registry(Generic[T]):
    """A named collection of constructors (encoders, fusions, methods, recipes), with the
    entries of entry point group ``group`` (none if empty) added on first query."""

    def __init__(self, kind: str, group: str = ""):
        self.kind, self.group = kind, group
        self._entries: dict[str, T] = {}
        self._sources: dict[str, str] = {}  # name -> BUILTIN or the distribution's 'name version'
        self._plugins_loaded = not group

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding the decorated class or function under ``name``."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise RegistryError(f"{self.kind} {name!r} is registered twice")
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
        """Import every entry point of ``group`` once; all of them or, on an error, none."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True  # a plugin that queries this registry while loading
        try:
            found = self._import_plugins()
        except RegistryError:
            self._plugins_loaded = False  # the next query says the same
            raise
        for name, (obj, source) in found.items():
            self._entries[name], self._sources[name] = obj, source

    def _import_plugins(self) -> dict[str, tuple[T, str]]:
        """``{name: (object, source)}`` of every entry point of ``group``, checked."""
        found: dict[str, tuple[T, str]] = {}
        for entry_point in metadata.entry_points(group=self.group):
            source, name = _source(entry_point), entry_point.name
            where = f"plugin {source}, entry point {name} = {entry_point.value} in {self.group}"
            taken = self._sources.get(name) or (found[name][1] if name in found else "")
            if taken:
                raise RegistryError(f"{where}: {self.kind} {name!r} is already registered by "
                                    f"{taken}; rename the entry point")
            try:
                obj = entry_point.load()
            except Exception as err:  # any failure of foreign code while importing is the plugin's
                raise RegistryError(f"{where} failed to load ({type(err).__name__}: {err}); "
                                    f"fix or uninstall that distribution") from None
            found[name] = (obj, source)
        return found
