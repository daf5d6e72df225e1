"""Dataset recipes, chosen by name: one module adds one recipe with ``@register``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol

from ccat.errors import UserError
from preprocess.splits import Entry, SplitRow


class LayoutError(UserError, ValueError):
    """A raw folder is not the layout a recipe expects; the message says what was expected."""


class Recipe(Protocol):
    """How one dataset's raw media become samples.

    Recipes are plain picklable objects: the builder sends them to worker processes.
    """

    name: str
    classes: list[str]
    unit: ClassVar[str]  # what one sample is called in summaries: "clips", "pairs"

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


RECIPES: dict[str, Callable[..., Recipe]] = {}


def register(name: str) -> Callable[[Callable[..., Recipe]], Callable[..., Recipe]]:
    """Class decorator adding a recipe under ``name``; a duplicate name is an error."""

    def add(factory: Callable[..., Recipe]) -> Callable[..., Recipe]:
        if name in RECIPES:
            raise ValueError(f"dataset recipe {name!r} is registered twice")
        RECIPES[name] = factory
        return factory

    return add
