"""The plan of a build: which samples go into which split, and which shard.

:func:`plan` finds the samples and assigns the splits from the options alone (seeded), and
:func:`shard_tasks` cuts each split into shards: shard ``i`` of a split is built from the
split's planned samples ``i * shard_size`` to ``(i + 1) * shard_size - 1`` (split, then key
order), less the bad ones, which are skipped and recorded. Every process of a build (one,
``--workers``, a ``--part``, a Slurm task) builds the shards this cuts, so the bytes depend
on the plan alone. :func:`plan_record` is what a resumed build must share with the
interrupted one (:mod:`preprocess.resume`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ccat.data import spec
from preprocess import __version__ as TOOL_VERSION, rawhash
from preprocess.datasets import (SEED, SPLITS_DIR, OptionError, Range, Recipe, check_choice,
                                 check_options, option, own_lists)
from preprocess.splits import (Entry, SplitError, SplitRow, assign_splits, check_unique,
                               class_counts, required_splits, split_gap)

PLAN_NAME = "plan.json"  # the interrupted build's plan, in STATE_DIR
# How planned samples map to shards; a plan record of another layout is not resumed.
SHARD_LAYOUT = "shard i holds planned samples [i*shard_size, (i+1)*shard_size) less bad ones"
MAX_WORKERS = 256  # each worker holds its own torch and PyAV (a few hundred MB)
MAX_SHARD_SIZE = 65536  # samples per shard; shards are streamed, records list their keys
FRACTION = Range(0.0, 0.9)  # --val-fraction, --test-fraction; their sum must stay below 1


@dataclass(frozen=True)
class BuildOptions:
    """The options of every ``ccat-data build NAME`` (its flags are made from these fields).

    Each number is checked against its field's range when the options are made, so a bad
    value stops a build before it reads or removes anything."""

    workers: int = option(0, "Processes; 0 = all cores.", within=Range(0, MAX_WORKERS))
    shard_size: int = option(256, "Samples per shard.", within=Range(1, MAX_SHARD_SIZE))
    seed: int = option(0, "Seed of the stratified splits.", within=SEED)
    val_fraction: float = option(0.1, "Share of train carved out as validation.",
                                 within=FRACTION)
    test_fraction: float = option(0.1, "Share held out as test when no split files are given.",
                                  within=FRACTION)
    strict: bool = option(False, "Stop at the first bad sample instead of skipping it.")
    overwrite: bool = option(False, "Replace the build (finished or interrupted) that --out "
                                    "holds; it is kept until the new build has shards.")
    raw_hash: str = option(rawhash.DEFAULT, "Hash of the raw files that the fingerprint covers: "
                           "blake3, or sha256 (as builds before this option, whose "
                           "fingerprint a rebuild then keeps).")

    def __post_init__(self) -> None:
        check_options(self)
        check_choice("--raw-hash", self.raw_hash, rawhash.ALGORITHMS)
        if self.val_fraction + self.test_fraction >= 1:
            raise OptionError(f"--val-fraction {self.val_fraction} and --test-fraction "
                              f"{self.test_fraction} add up to 1 or more, leaving train no "
                              "samples: give fractions whose sum is below 1")



@dataclass(frozen=True)
class ShardTask:
    """One shard to build: its split, its index and its planned samples, in order."""

    split: str
    index: int
    entries: tuple[Entry, ...]

    @property
    def name(self) -> str:
        return spec.shard_name(self.split, self.index)


def shard_tasks(splits: dict[str, list[Entry]], shard_size: int) -> list[ShardTask]:
    """Every shard of the plan, split by split, in index order."""
    return [ShardTask(name, i // shard_size, tuple(splits[name][i:i + shard_size]))
            for name in ordered(splits) for i in range(0, len(splits[name]), shard_size)]


def ordered(splits: dict[str, Any]) -> list[str]:
    """The split names in manifest order: train, val, test, then any other, sorted."""
    others = sorted(set(splits) - set(spec.SPLIT_NAMES))
    return [s for s in spec.SPLIT_NAMES if s in splits] + others


def plan(recipe: Recipe, raw: Path, split_files: dict[str, Path],
         options: BuildOptions) -> tuple[dict[str, Any], dict[str, list[Entry]], list[dict], int]:
    """Find samples and assign splits: ``(manifest head, splits, skipped, unlisted)``.

    The head holds every manifest key but ``splits``, ``skipped`` and the identity fields
    that only the build itself learns (``sources.raw``, ``fingerprint``).
    """
    if not split_files and getattr(recipe, "needs_split_files", False):
        raise SplitError(f"{recipe.name} has no seeded split of its own (its samples share "
                         f"speakers): give its published split files with --split, or put "
                         f"them under {raw / SPLITS_DIR} (`ccat-data download {recipe.name}`)")
    found, unusable = recipe.find(raw)
    own = own_lists(recipe, raw, found, split_files)
    listed = own.rows if own else {name: _read_split(recipe, name, path)
                                   for name, path in sorted(split_files.items())}
    check_unique(listed, split_files)
    splits, missing = assign_splits(found, listed or None, seed=options.seed,
                                    val_fraction=options.val_fraction,
                                    test_fraction=options.test_fraction)
    unusable, missing = _explain_missing(unusable, missing)
    if own:
        missing += own.skipped
    in_splits = {row.key for rows in listed.values() for row in rows}
    in_splits |= {record["id"] for record in own.skipped} if own else set()
    unlisted = len(set(found) - in_splits) if listed else 0
    list_files = {**recipe.list_files(raw), **split_files}
    head = {
        "spec_version": spec.SPEC_VERSION,
        "dataset": recipe.name,
        "classes": list(recipe.classes),
        "modalities": recipe.modalities(),
        "sources": {
            "split_files": {name: spec.file_sha256(path)
                            for name, path in sorted(list_files.items())},
            "split": {"seed": options.seed, "val_fraction": options.val_fraction,
                      "test_fraction": None if listed else options.test_fraction},
            "shard_size": options.shard_size,
            "build": {"workers": options.workers, "strict": options.strict,
                      "raw_hash": options.raw_hash},
            # how a recipe with a choice of label rules made the classes (MOSEI: 2 or 7)
            **({"labels": recipe.label_rule()} if hasattr(recipe, "label_rule") else {}),
        },
        "tool_version": TOOL_VERSION,
    }
    facts = getattr(recipe, "facts", None)  # a recipe's own record: class order, fold, ...
    record = {**(facts() if facts is not None else {}), **(own.record if own else {})}
    if record:
        head["sources"]["recipe"] = record
    _check_planned_splits(recipe, splits, listed, options)
    return head, splits, unusable + missing, unlisted


def _read_split(recipe: Recipe, split: str, path: Path) -> list[SplitRow]:
    """The rows ``path`` lists for ``split``: a recipe whose one file lists every split (the
    MOSEI folds) reads it with ``read_split(path, split)``, after its ``find``."""
    read_split = getattr(recipe, "read_split", None)
    return read_split(path, split) if read_split else recipe.read_split_file(path)


def _check_planned_splits(recipe: Recipe, splits: dict[str, list[Entry]],
                          listed: dict[str, Any], options: BuildOptions) -> None:
    """Refuse, before anything is decoded or removed, splits that could not be trained and
    scored on (:func:`preprocess.splits.split_gap`)."""
    counts = {name: class_counts(entries, len(recipe.classes)) for name, entries in splits.items()}
    gap = split_gap(counts, required_splits(listed, options.val_fraction, options.test_fraction),
                    recipe.classes)
    if not gap:
        return
    if listed:
        raise SplitError(f"{gap} with the split files given ({', '.join(sorted(listed))}) and "
                         f"--val-fraction {options.val_fraction}; check that the files list "
                         "samples whose media are under --raw, or change --val-fraction")
    found = sum(map(len, splits.values()))
    raise SplitError(f"{gap} with --test-fraction {options.test_fraction} and --val-fraction "
                     f"{options.val_fraction} of the {found} samples found; lower the "
                     "fractions (0 asks for no such split) or add samples")


def _explain_missing(unusable: list[dict], missing: list[dict]) -> tuple[list[dict], list[dict]]:
    """A listed id that the recipe found but could not use keeps the recipe's reason (and
    gets the split that lists it) instead of 'no media for this id'."""
    problems = {record["id"]: record for record in unusable}
    explained = []
    for record in missing:
        problem = problems.pop(record["id"], None)
        explained.append({**problem, "split": record["split"]} if problem else record)
    return list(problems.values()), explained


def plan_record(head: dict[str, Any], splits: dict[str, list[Entry]], raw: Path) -> dict[str, Any]:
    """What a resumed build must share with the interrupted one: the parameters, every
    split's (key, label, source files) and the raw files that exist."""
    params = {k: head[k] for k in ("spec_version", "dataset", "classes", "modalities")}
    params["sources"] = {k: v for k, v in head["sources"].items()
                         if k not in spec.UNFINGERPRINTED_SOURCES}
    members = {name: [[e.key, e.label, sorted(e.sources.values())] for e in entries]
               for name, entries in splits.items()}
    files = sorted({rel for entries in splits.values() for e in entries
                    for rel in e.sources.values() if (raw / rel).is_file()})
    return {"params": params, "splits": members, "files": files, "layout": SHARD_LAYOUT,
            "raw_hash": head["sources"]["build"]["raw_hash"]}

