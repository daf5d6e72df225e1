"""Dataset recipes, chosen by name: one module adds one recipe with ``@register``; other
installed packages add theirs through the ``ccat.recipes`` entry point group."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

from ccat.registry import Registry
from preprocess.splits import Entry, SplitRow


class LayoutError(ValueError):
    """A raw folder is not the layout a recipe expects; the message says what was expected."""


class Recipe(Protocol):
    """How one dataset's raw media become samples.

    Recipes are plain picklable objects: the builder sends them to worker processes.
    """

    name: str
    classes: list[str]

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


RECIPES: Registry[Callable[..., Recipe]] = Registry("dataset recipe", "ccat.recipes")
register = RECIPES.register  # class decorator adding a recipe under a name, once

from preprocess.datasets import cremad, ks, mvsa  # noqa: E402,F401 (importing registers them)
