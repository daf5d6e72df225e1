"""Split assignment: published split files when given, else seeded class-stratified splits.

A validation split is always carved from train (seeded, stratified) unless a split file
for it is given, because hyperparameters (LoRA rank, beta) are chosen on validation.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import numpy as np

from ccat.errors import UserError

VAL_SALT = 1  # separate random streams for the test and the validation carve
TEST_SALT = 2
SPLIT_ORDER = ("train", "val", "test")  # as spec.SPLIT_NAMES, for messages
UNKNOWN_LABEL = -1  # an entry whose class only a split file can tell (e.g. a flat clip folder)


class SplitError(UserError, ValueError):
    """A split file cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Entry:
    """One sample the recipe found: its key, class index (or UNKNOWN_LABEL) and source
    files relative to the raw folder."""

    key: str
    label: int
    sources: dict[str, str]


class SplitRow(NamedTuple):
    """One row of a split file: the sample key, its class index and its 1-based line."""

    key: str
    label: int
    line: int


def numbered_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, stripped text)`` of each non-empty line of a text file, numbered as
    an editor numbers them; a UTF-8 BOM and CRLF line ends are fine."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise SplitError(f"split file {path} does not exist; check the --split path") from None
    except UnicodeDecodeError as err:
        raise SplitError(f"split file {path} is not UTF-8 text ({err}); "
                         "pass the published split file unchanged") from None
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1)
            if line.strip()]


def read_text_lines(path: Path) -> list[str]:
    """Non-empty lines of a text file, tolerating a UTF-8 BOM and CRLF line ends."""
    return [line for _, line in numbered_lines(path)]


def check_unique(listed: dict[str, list[SplitRow]], files: dict[str, Any]) -> None:
    """A key is listed once in one split file: a repeat, in the same file or another, is a
    SplitError naming the file(s) and both line numbers (exact repeats included: the list
    would otherwise say two things about one sample, or one sample twice)."""
    files = {**{split: f"the {split} list" for split in listed}, **files}
    seen: dict[str, tuple[str, SplitRow]] = {}
    for split, rows in listed.items():
        for row in rows:
            if row.key not in seen:
                seen[row.key] = (split, row)
                continue
            first_split, first = seen[row.key]
            where = (f"{files[split]} lines {first.line} and {row.line}" if first_split == split
                     else f"{files[first_split]} line {first.line} and {files[split]} line "
                          f"{row.line}")
            raise SplitError(f"{row.key} is listed twice ({where}); a sample belongs to one "
                             "split, once: remove one of the rows")


def stratified_carve(entries: list[Entry], fraction: float, seed: int,
                     salt: int) -> tuple[list[Entry], list[Entry]]:
    """Split ``entries`` into ``(kept, carved)`` with ``fraction`` of every class carved.

    Deterministic: entries are sorted by key per class before a seeded shuffle.
    """
    if not 0.0 <= fraction < 1.0:
        raise SplitError(f"split fraction {fraction} must be in [0, 1)")
    by_class: dict[int, list[Entry]] = defaultdict(list)
    for entry in sorted(entries, key=lambda e: e.key):
        by_class[entry.label].append(entry)
    rng = np.random.default_rng([seed, salt])
    kept, carved = [], []
    for label in sorted(by_class):
        members = by_class[label]
        order = rng.permutation(len(members))
        take = int(round(fraction * len(members)))
        if fraction > 0 and take == 0 and len(members) > 1:
            take = 1  # a tiny class still gives the carved split one sample
        carved.extend(members[i] for i in order[:take])
        kept.extend(members[i] for i in order[take:])
    return sorted(kept, key=lambda e: e.key), sorted(carved, key=lambda e: e.key)


def assign_splits(found: dict[str, Entry], listed: dict[str, list[SplitRow]] | None,
                  *, seed: int, val_fraction: float, test_fraction: float,
                  ) -> tuple[dict[str, list[Entry]], list[dict[str, str]]]:
    """Assign the found entries to train/val/test.

    ``listed`` maps split name -> rows of published split files (keys unique); ids listed
    there with no media become skipped records. Without split files, a stratified
    ``test_fraction`` of everything found becomes test. Returns ``(splits, skipped)``.
    """
    skipped: list[dict[str, str]] = []
    if listed:
        splits: dict[str, list[Entry]] = {}
        for split, rows in listed.items():
            members = []
            for key, label, _ in rows:
                entry = found.get(key)
                if entry is None:
                    skipped.append({"id": key, "split": split, "reason": "no media for this id"})
                elif entry.label == UNKNOWN_LABEL:
                    members.append(Entry(entry.key, label, entry.sources))
                elif entry.label != label:
                    skipped.append({"id": key, "split": split,
                                    "reason": "split file label disagrees with the media",
                                    "detail": f"file says {label}, media say {entry.label}"})
                else:
                    members.append(entry)
            splits[split] = sorted(members, key=lambda e: e.key)
    else:
        unlabelled = [e for e in found.values() if e.label == UNKNOWN_LABEL]
        skipped += [{"id": e.key, "split": None, "reason": "no label: no split file names it"}
                    for e in unlabelled]
        labelled = [e for e in found.values() if e.label != UNKNOWN_LABEL]
        train, test = stratified_carve(labelled, test_fraction, seed, TEST_SALT)
        splits = {"train": train, "test": test}
    if "val" not in splits and "train" in splits:
        splits["train"], splits["val"] = stratified_carve(splits["train"], val_fraction, seed,
                                                          VAL_SALT)
    return splits, skipped


def required_splits(listed: Iterable[str], val_fraction: float,
                    test_fraction: float) -> set[str]:
    """The splits a plan must fill: train, every split a file lists, and each split that a
    fraction above 0 carves (val from train; test from everything, when no file is given).
    A fraction of 0 asks for no such split, which is then allowed to be empty."""
    listed = set(listed)
    required = {"train", *listed}
    if val_fraction > 0:
        required.add("val")
    if not listed and test_fraction > 0:
        required.add("test")
    return required


def class_counts(entries: Iterable[Entry], num_classes: int) -> list[int]:
    """How many of ``entries`` each class has."""
    counts = [0] * num_classes
    for entry in entries:
        counts[entry.label] += 1
    return counts


def empty_splits(counts: dict[str, list[int]], required: set[str]) -> str:
    """The required splits that ``counts`` (per split, per class) leave without samples, in
    words ("split val and test would hold no samples"), or "" when none is empty."""
    empty = [name for name in sorted(required, key=_split_order) if not sum(counts.get(name, []))]
    return f"split {_and(empty)} would hold no samples" if empty else ""


def split_gap(counts: dict[str, list[int]], required: set[str], classes: list[str]) -> str:
    """Why a plan with these per-class ``counts`` cannot be trained and scored on, in
    words, or "" when it can: a required split without samples (:func:`empty_splits`), or
    a class that val or test holds and train does not (a model never shown the class
    would be scored on it)."""
    empty = empty_splits(counts, required)
    if empty:
        return empty
    train = counts["train"]
    elsewhere = sorted({c for name, row in counts.items() if name != "train"
                        for c, n in enumerate(row) if n})
    missing = [classes[c] for c in elsewhere if not train[c]]
    if missing:
        return (f"train would hold no sample of class {_and(missing)}, which the other "
                "splits hold")
    return ""


def _split_order(name: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(name) if name in SPLIT_ORDER else len(SPLIT_ORDER), name)


def _and(names: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return " and ".join(filter(None, [", ".join(names[:-1]), names[-1]]))


def parse_split_arguments(values: list[str]) -> dict[str, Path]:
    """``["train=a.csv", "test=b.csv"]`` -> ``{"train": Path("a.csv"), ...}``."""
    parsed: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SplitError(f"--split {value!r} must look like NAME=FILE, e.g. "
                             "train=data/raw/cremad/splits/train.csv (where `ccat-data "
                             "download cremad` puts the published list)")
        if name not in ("train", "val", "test"):
            raise SplitError(f"--split {value!r}: the split name must be train, val or test")
        if name in parsed:
            raise SplitError(f"--split {name}= is given twice; give each split once")
        parsed[name] = Path(path)
    return parsed
