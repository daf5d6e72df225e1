"""Name -> constructor registries: one file adds one entry, a duplicate name is an error."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from ccat.errors import UserError

T = TypeVar("T")


class RegistryError(UserError, KeyError):
    """An unknown name was asked for, or a name was registered twice."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(Generic[T]):
    """A named collection of constructors (encoders, fusions, methods)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding the decorated class or function under ``name``."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise RegistryError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise RegistryError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)
