"""Parallel, resumable, deterministic shard writing, and the manifest.

The plan fixes every shard: shard ``i`` of a split is built from the split's planned
samples ``i * shard_size`` to ``(i + 1) * shard_size - 1`` (split, then key order), less the
bad ones, which are skipped and recorded. A worker process builds whole shards: it decodes
their samples in order, streams the tar through :func:`ccat.fileio.atomic_writer` while
hashing it and writes the shard's record into ``<out>/.build/`` (keys, labels, skipped
samples with reasons, the sha256 of every raw file read, the tar's size and sha256). Shard
bytes therefore depend on the plan alone, never on timing or worker count, and the parent
only collects records. A build started again goes on only when its plan (parameters, the
samples of every split, the raw files and the content of those already read) is the
interrupted one's, and keeps only the shards whose bytes match their record; otherwise it
refuses and says what changed. ``manifest.json`` is written last, atomically, with each
shard's membership (its keys and labels, in order) and the membership and raw-content
hashes the fingerprint covers; then the records are removed. The ``--out`` folder itself
(its lock, and the build an ``--overwrite`` replaces) is :mod:`preprocess.outdir`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import tarfile
import threading
import time
from collections import Counter, deque
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as connection_wait
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ccat import fileio
from ccat.data import kinds, shardio, spec
from preprocess import __version__ as TOOL_VERSION, outdir, rawhash
from preprocess.datasets import (SEED, SPLITS_DIR, OptionError, Range, Recipe, check_choice,
                                 check_options, option, own_lists)
from preprocess.media import MediaError
from preprocess.outdir import STATE_DIR, TMP_SUFFIX, BuildError, locked, write_error
from preprocess.splits import (Entry, SplitError, SplitRow, assign_splits, check_unique,
                               class_counts, empty_splits, required_splits, split_gap)

PLAN_NAME = "plan.json"  # the interrupted build's plan, in STATE_DIR
# How planned samples map to shards; a plan record of another layout is not resumed.
SHARD_LAYOUT = "shard i holds planned samples [i*shard_size, (i+1)*shard_size) less bad ones"
PROGRESS_POLL_S = 0.05  # how often the parent reads the workers' per-sample reports
# Workers are started only when the work left, estimated from this process's first
# PROBE_SAMPLES, would take longer than WORKER_START_MIN_S here alone: the fork server
# first spends about a second of CPU importing torch and PyAV, which a shorter build
# (the 240-clip demo) would only lose to.
PROBE_SAMPLES = 8
WORKER_START_MIN_S = 2.0
MAX_WORKERS = 256  # each worker holds its own torch and PyAV (a few hundred MB)
MAX_SHARD_SIZE = 65536  # samples per shard; shards are streamed, records list their keys
FRACTION = Range(0.0, 0.9)  # --val-fraction, --test-fraction; their sum must stay below 1
RECORD_KEYS = ("name", "num_samples", "bytes", "sha256", "class_counts", "skipped", "members",
               "hashes")


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


@dataclass
class BuildReport:
    """What a build did, for the summary table."""

    manifest: dict[str, Any]
    processed: int = 0
    resumed_shards: int = 0
    seconds: float = 0.0
    unlisted: int = 0
    out: Path = Path(".")
    workers: int = 1  # processes that built shards: this one and the workers it started
    first_sample_s: float | None = None  # from the call of build() to the first sample done
    rebuilt: dict[str, str] = field(default_factory=dict)  # shard -> why its bytes were not kept

    @property
    def clips_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class ShardTask:
    """One shard to build: its split, its index and its planned samples, in order."""

    split: str
    index: int
    entries: tuple[Entry, ...]

    @property
    def name(self) -> str:
        return spec.shard_name(self.split, self.index)


@dataclass
class Result:
    """The outcome of processing one sample."""

    key: str
    label: int
    members: dict[str, bytes] | None = None
    reason: str = ""
    detail: str = ""
    sources: dict[str, str] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- worker side

_WORKER: dict[str, Any] = {}


def _init_worker(recipe: Recipe, raw: Path, out: Path, num_classes: int, strict: bool,
                 raw_hash: str, report: Callable[[], None] | Any) -> None:
    """Set up a shard builder. ``report`` is called (in this process) or, a queue, is put
    to (from a worker) once per sample done."""
    import torch

    torch.set_num_threads(1)  # one process per core; intra-op threads would oversubscribe
    _WORKER.update(recipe=recipe, raw=raw, modalities=recipe.modalities(), out=out,
                   num_classes=num_classes, strict=strict, raw_hash=raw_hash,
                   report=report if callable(report) else lambda: report.put(1))


def _process(entry: Entry) -> Result:
    """Process one sample; the raw files it reads are hashed as the decoders read them
    (:mod:`preprocess.rawhash`), any other of its files afterwards, from disk."""
    with rawhash.recording(_WORKER["raw_hash"]) as read:
        result = _decode(entry)
    result.hashes = rawhash.source_hashes(_WORKER["raw"], entry.sources.values(),
                                          _WORKER["raw_hash"], read)
    return result


def _decode(entry: Entry) -> Result:
    recipe: Recipe = _WORKER["recipe"]
    try:
        members, meta = recipe.process(_WORKER["raw"], entry)
    except MediaError as err:
        return Result(entry.key, entry.label, reason=err.reason, detail=_relative(err.detail),
                      sources=entry.sources)
    except Exception as err:  # noqa: BLE001 - one bad file must never stop a build
        return Result(entry.key, entry.label, reason="unexpected error while decoding",
                      detail=_relative(f"{type(err).__name__}: {err}"), sources=entry.sources)
    meta = {"id": entry.key, "label": recipe.classes[entry.label], "sources": entry.sources,
            **meta}
    members[spec.LABEL_MEMBER] = shardio.encode_label(entry.label)
    members[spec.META_MEMBER] = spec.encode_json(meta)
    kinds.check_written(entry.key, members, _WORKER["modalities"])  # a recipe bug stops the build
    return Result(entry.key, entry.label, members)


def _relative(detail: str) -> str:
    """Error details name files relative to the raw folder: manifests stay machine-free."""
    return detail.replace(f"{_WORKER['raw']}{os.sep}", "")


class _HashingFile:
    """A write-only file that hashes and counts what goes through it (for tarfile)."""

    def __init__(self, file: Any) -> None:
        self.file, self.digest, self.size = file, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.file.write(data)

    def tell(self) -> int:
        return self.size


class _NoSamples(Exception):
    """Raised inside a shard's atomic write when none of its samples was good: no tar."""


def _build_shard(task: ShardTask) -> dict[str, Any]:
    """Build one shard from its planned samples and record it; returns the record.

    A shard whose samples are all bad writes no tar (a record of 0 samples and its skips).
    """
    out: Path = _WORKER["out"]
    path = out / task.name
    counts, members, skipped, hashes = [0] * _WORKER["num_classes"], [], [], {}
    try:
        with fileio.atomic_writer(path) as file:
            sink = _HashingFile(file)
            with tarfile.open(fileobj=sink, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for entry in task.entries:
                    result = _process(entry)
                    hashes.update(result.hashes)
                    if result.members is None:
                        skipped.append(_skip_record(task.split, result))
                    else:
                        shardio.write_sample(tar, result.key, result.members)
                        members.append([result.key, result.label])
                        counts[result.label] += 1
                    _WORKER["report"]()
            if not members:
                raise _NoSamples
    except _NoSamples:
        pass
    except OSError as err:
        raise write_error(err, path) from None
    record = {"name": task.name, "num_samples": len(members),
              "bytes": sink.size if members else 0,
              "sha256": sink.digest.hexdigest() if members else "", "class_counts": counts,
              "skipped": skipped, "members": members, "hashes": hashes}
    _atomic_write(_state_path(out, task.name), spec.encode_json(record))
    return record


def _skip_record(split: str, result: Result) -> dict[str, Any]:
    """The manifest's record of a bad sample; under --strict, the build stops instead."""
    if _WORKER["strict"]:
        raise BuildError(_strict_message({"id": result.key, "reason": result.reason,
                                          "detail": result.detail}, result.sources))
    record = {"id": result.key, "split": split, "reason": result.reason}
    return {**record, "detail": result.detail} if result.detail else record


def worker_context() -> multiprocessing.context.BaseContext:
    """Workers fork from a clean, single-threaded server that has imported the decoders.

    Plain fork deadlocked: by then the parent may hold threads (codecs, BLAS, OpenMP, the
    progress bar) whose locks a forked child inherits taken; spawn would re-import torch
    and PyAV per worker.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["preprocess.writer"])
    return context


# ---------------------------------------------------------------- shard side


def shard_tasks(splits: dict[str, list[Entry]], shard_size: int) -> list[ShardTask]:
    """Every shard of the plan, split by split, in index order."""
    return [ShardTask(name, i // shard_size, tuple(splits[name][i:i + shard_size]))
            for name in _ordered(splits) for i in range(0, len(splits[name]), shard_size)]


def _state_path(out: Path, name: str) -> Path:
    return out / STATE_DIR / f"{name}.json"


def _reusable_records(out: Path, tasks: list[ShardTask], num_classes: int, workers: int,
                      ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The records an interrupted run of this plan left whose shards can be kept: the
    record is whole and its tar's size and sha256 are the recorded ones. Returns them by
    shard name, and the shards that have a record but cannot be kept, with why (they are
    built again)."""
    def look(task: ShardTask) -> tuple[dict[str, Any] | None, str]:
        path = _state_path(out, task.name)
        if not path.is_file():
            return None, ""
        record = _read_json(path)
        if record is None or not _record_fits(record, task, num_classes):
            return None, "its record is unreadable"
        if not record["num_samples"]:
            return record, ""
        why = shard_mismatch(out / task.name, record["bytes"], record["sha256"])
        return (None, why) if why else (record, "")

    with ThreadPoolExecutor(max(1, workers)) as pool:  # hashing releases the GIL
        found = dict(zip((t.name for t in tasks), pool.map(look, tasks)))
    return ({name: record for name, (record, _) in found.items() if record is not None},
            {name: why for name, (_, why) in found.items() if why})


def _record_fits(record: dict[str, Any], task: ShardTask, num_classes: int) -> bool:
    """Whether ``record`` is a whole record of ``task``: every key with its type, counts
    that add up, and exactly the task's samples, each kept (with its planned label) or
    skipped. A record edited or cut short is not, and its shard is built again."""
    def count(value: Any) -> bool:
        return type(value) is int and value >= 0

    if set(record) != set(RECORD_KEYS) or record["name"] != task.name:
        return False
    members, skipped, counts = record["members"], record["skipped"], record["class_counts"]
    n, digest = record["num_samples"], record["sha256"]
    if not (count(n) and count(record["bytes"]) and isinstance(digest, str)
            and (spec.SHA256_PATTERN.match(digest) if n else digest == "")
            and isinstance(counts, list) and len(counts) == num_classes
            and all(map(count, counts)) and sum(counts) == n
            and isinstance(members, list) and len(members) == n
            and isinstance(skipped, list) and all(isinstance(s, dict) for s in skipped)
            and isinstance(record["hashes"], dict)
            and all(isinstance(v, str) for v in record["hashes"].values())):
        return False
    planned = {e.key: e.label for e in task.entries}
    kept = [(m[0], m[1]) for m in members if isinstance(m, list) and len(m) == 2
            and isinstance(m[0], str) and type(m[1]) is int]
    dropped = [s.get("id") for s in skipped]
    return (len(kept) == n and all(isinstance(key, str) for key in dropped)
            and all(planned.get(key) == label for key, label in kept)
            and sorted([key for key, _ in kept] + dropped) == sorted(planned))


def shard_mismatch(path: Path, size: int, sha256: str) -> str:
    """Why the file ``path`` is not the shard recorded with ``size`` and ``sha256``, in
    words ("missing", ...), or "" when its bytes are the recorded ones."""
    try:
        if path.stat().st_size != size:
            return "size differs"
        return "" if spec.file_sha256(path) == sha256 else "sha256 differs"
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return f"unreadable: {err.strerror}"


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` atomically (:mod:`ccat.fileio`); a failure is one BuildError sentence."""
    try:
        fileio.write_bytes(path, data)
    except OSError as err:
        raise write_error(err, path) from None


def split_entry(records: list[dict[str, Any]], num_classes: int) -> dict[str, Any]:
    """A split's manifest entry from its shard records (shards without samples left out)."""
    kept = [r for r in records if r["num_samples"]]
    shards = [{**{k: r[k] for k in ("name", "num_samples", "bytes", "sha256")},
               "membership": spec.format_membership(r["members"])} for r in kept]
    counts = [sum(r["class_counts"][c] for r in kept) for c in range(num_classes)]
    members = [row for r in kept for row in r["members"]]
    return {"num_samples": sum(s["num_samples"] for s in shards), "shards": shards,
            "class_counts": counts, "membership_sha256": spec.membership_sha256(members)}


# ---------------------------------------------------------------- the plan


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


def _param_changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Differing parameters of two manifest-like dicts, identity hashes left out."""
    def params(tree: dict[str, Any]) -> dict[str, Any]:
        flat = spec.fingerprint_params({**tree, "splits": {}})
        return {k: v for k, v in flat.items() if not k.startswith("sources.raw.")}

    return spec.diff_fingerprint_params(params(before), params(now))


def _hash_files(raw: Path, relatives: Iterable[str], workers: int,
                algorithm: str) -> dict[str, str]:
    """Digests of raw files on ``workers`` threads (hashlib and blake3 release the GIL)."""
    relatives = sorted(relatives)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        digests = pool.map(lambda rel: rawhash.source_hashes(raw, [rel], algorithm), relatives)
    return {rel: digest for found in digests for rel, digest in found.items()}


def _interrupted_changes(old: dict[str, Any] | None, new: dict[str, Any],
                         recorded: dict[str, str], raw: Path, workers: int) -> list[str]:
    """What differs between an interrupted build's plan and this one, in words; a plan
    record that cannot be compared is itself the difference."""
    if old and "raw_hash" not in old:  # a plan recorded before --raw-hash: sha256
        old = {**old, "raw_hash": rawhash.LEGACY}
    if not old or set(old) != set(new):
        return [_unusable_plan(old)]
    try:
        return _plan_changes(old, new, recorded, raw, workers)
    except (KeyError, TypeError, AttributeError, ValueError, RecursionError):
        return [_unusable_plan(None)]


def _plan_changes(old: dict[str, Any], new: dict[str, Any], recorded: dict[str, str],
                  raw: Path, workers: int) -> list[str]:
    """:func:`_interrupted_changes` of a plan record of this layout."""
    changes = _param_changes(old["params"], new["params"])
    if old["raw_hash"] != new["raw_hash"]:  # the shards recorded hold the other algorithm's
        return [*changes, f"raw files hashed with {old['raw_hash']}, now {new['raw_hash']} "
                          f"(--raw-hash {old['raw_hash']} resumes it)"]
    old_files, new_files = set(old["files"]), set(new["files"])
    now = _hash_files(raw, set(recorded) & new_files, workers, new["raw_hash"])
    changed = sum(now.get(rel) != digest for rel, digest in recorded.items() if rel in new_files)
    added, removed = len(new_files - old_files), len(old_files - new_files)
    if added or removed or changed:
        changes.append(f"raw files: {added} added, {removed} removed, {changed} changed")
    moved = [name for name in sorted(set(old["splits"]) | set(new["splits"]))
             if old["splits"].get(name) != new["splits"].get(name)]
    if moved:
        changes.append(f"samples of split {', '.join(moved)} differ")
    return changes


def _finished_changes(previous: dict[str, Any], head: dict[str, Any], new: dict[str, Any],
                      raw: Path, workers: int) -> list[str]:
    """What differs between a finished build's (checked) manifest and this plan, in words."""
    changes = _param_changes(previous, head)
    if changes:
        return changes
    old_raw = previous["sources"]["raw"]
    algorithm = rawhash.algorithm_of(old_raw)  # a finished build is checked as it was built
    now = rawhash.raw_content(_hash_files(raw, new["files"], workers, algorithm), algorithm)
    if now != old_raw:
        changes.append(f"raw files: {old_raw['num_files']} then, {now['num_files']} now, "
                       "their content differs")
    return changes


# ---------------------------------------------------------------- the --out folder


def _prepare_out(out: Path, head: dict[str, Any], new_plan: dict[str, Any], raw: Path,
                 options: BuildOptions) -> dict[str, Any] | None:
    """Check that ``out`` may take this build, starting it afresh or resuming it.

    Returns the manifest when ``out`` already holds this build, finished. Refuses (one
    sentence) a folder holding other files, another finished build or another plan. With
    ``--overwrite`` the build there is moved aside (:mod:`preprocess.outdir`), not removed.
    """
    foreign = outdir.foreign_files(out)
    if foreign:
        raise BuildError(f"{out} holds files that are not a build of this toolkit "
                         f"({', '.join(foreign[:3])}); choose an empty --out folder")
    if not options.overwrite:
        finished, refusal = _previous_build(out, head, new_plan, raw, options.workers)
        if refusal:
            raise BuildError(f"{out} {refusal}; run with --overwrite to replace it, or choose "
                             "another --out")
        return finished
    outdir.move_aside(out)
    _atomic_write(out / STATE_DIR / PLAN_NAME, spec.encode_json(new_plan))
    return None


def _previous_build(out: Path, head: dict[str, Any], new_plan: dict[str, Any], raw: Path,
                    workers: int, shards: set[str] | None = None,
                    ) -> tuple[dict[str, Any] | None, str]:
    """``(finished manifest to reuse, "")``, ``(None, why out cannot take this build)``, or
    ``(None, "")`` to go on: resuming the same plan, or starting in an empty folder. A part
    of a build (``shards``: its shard names) checks the raw files of its own shards only."""
    state = out / STATE_DIR
    if (out / spec.MANIFEST_NAME).is_file():
        try:
            previous = spec.load_manifest(out)
        except spec.SpecError as err:
            return None, f"holds a build whose manifest.json cannot be reused ({err})"
        inexact = _inexact_count(previous)
        if inexact:
            return None, f"holds a build whose manifest.json cannot be reused ({inexact})"
        changes = _finished_changes(previous, head, new_plan, raw, workers)
        if changes:
            return None, f"already holds a finished build of other data ({'; '.join(changes)})"
        return previous, ""
    if (state / PLAN_NAME).is_file():
        changes = _interrupted_changes(_read_json(state / PLAN_NAME), new_plan,
                                       _recorded_hashes(state, shards), raw, workers)
        return None, (f"holds an interrupted build of other data ({'; '.join(changes)})"
                      if changes else "")
    if any(outdir.is_build_file(n) for n in os.listdir(out)) or outdir.state_entries(out):
        return None, "holds parts of an unfinished build whose plan is unknown"
    _atomic_write(state / PLAN_NAME, spec.encode_json(new_plan))
    return None, ""


def _inexact_count(manifest: dict[str, Any]) -> str:
    """The first sample or byte count of a (checked) manifest that is not a JSON integer,
    in words: JSON Schema takes 16.0 for an integer, and the builder never writes one."""
    for split, entry in manifest["splits"].items():
        counts = {f"splits.{split}.num_samples": entry["num_samples"]}
        counts.update((f"splits.{split}.shards[{i}].{key}", shard[key])
                      for i, shard in enumerate(entry["shards"])
                      for key in ("num_samples", "bytes"))
        for where, value in counts.items():
            if type(value) is not int:
                return f"{where} is {value!r}, not a whole number"
    return ""


def _unusable_plan(old: dict[str, Any] | None) -> str:
    """Why an interrupted build's plan record cannot be compared with this plan."""
    if old is None:
        return "its plan record is unreadable"
    return "it was started by an older ccat-data, which cut shards differently"


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when it is missing, unreadable or no object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _recorded_hashes(state: Path, shards: set[str] | None = None) -> dict[str, str]:
    """sha256 of the raw files an interrupted build has read, from its shard records (a
    record too damaged to say is left out: its shard is built again); of ``shards`` only
    when given."""
    recorded: dict[str, str] = {}
    for path in sorted(state.glob("*.json")):
        if path.name == PLAN_NAME or (shards is not None and path.stem not in shards):
            continue
        hashes = (_read_json(path) or {}).get("hashes")
        if isinstance(hashes, dict):
            recorded.update((k, v) for k, v in hashes.items() if isinstance(v, str))
    return recorded


# ---------------------------------------------------------------- the build


def build(recipe: Recipe, raw: Path, out: Path, split_files: dict[str, Path],
          options: BuildOptions, on_progress: Callable[[int, int], None] | None = None,
          ) -> BuildReport:
    """Build (or resume, or repair) the shards of ``recipe`` from ``raw`` into ``out``.

    The options, the raw folder, the split files and the plan are all checked before
    ``out`` is touched. ``on_progress(done, total)`` is called as samples finish, in
    whichever worker.
    """
    start = time.perf_counter()
    check_options(recipe)
    # a recipe may cap its processes (MOSEI: every worker would load the whole pickle)
    workers = min(options.workers or cores(), getattr(recipe, "max_workers", MAX_WORKERS))
    options = dataclasses.replace(options, workers=workers)
    head, splits, skipped, unlisted = plan(recipe, raw, split_files, options)
    if options.strict and skipped:
        raise BuildError(_strict_message(skipped[0]))
    with locked(out):
        outdir.restore_aside(out)  # an --overwrite killed before its build had shards
        outdir.remove_temporaries(out)
        _refuse_parts(out, options)
        try:
            finished = _prepare_out(out, head, plan_record(head, splits, raw), raw, options)
            if finished is not None:
                report = _repair(recipe, raw, out, finished, splits, options, on_progress, start)
            else:
                required = required_splits(split_files, options.val_fraction,
                                           options.test_fraction)
                report = _write_build(recipe, raw, out, head, splits, skipped, required,
                                      options, on_progress, start)
        except BaseException:
            outdir.restore_aside(out)  # a replaced build comes back until the new one has shards
            raise
    report.unlisted = unlisted
    report.seconds = time.perf_counter() - start
    return report


def _refuse_parts(out: Path, options: BuildOptions) -> None:
    """A one-machine build does not write into a build in parts (preprocess.parts), whose
    parts may be running elsewhere, unless it replaces it (--overwrite)."""
    records = outdir.part_records(out)
    if records and not options.overwrite:
        raise BuildError(f"{out} holds a build in parts ({', '.join(records[:3])} in "
                         f"{STATE_DIR}/); finish its parts and run `ccat-data merge {out}`, or "
                         "run with --overwrite to replace it")


def cores() -> int:
    """The CPU cores this process may run on (``--workers 0``)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _write_build(recipe: Recipe, raw: Path, out: Path, head: dict[str, Any],
                 splits: dict[str, list[Entry]], skipped: list[dict[str, Any]],
                 required: set[str], options: BuildOptions,
                 on_progress: Callable[[int, int], None] | None, start: float) -> BuildReport:
    """Build every shard that no earlier run of this plan left whole, then the manifest.

    A build that ``--overwrite`` moved aside is dropped once every required split has a
    finished shard with samples (:func:`build` puts it back when this stops before).
    """
    num_classes = len(recipe.classes)
    tasks = shard_tasks(splits, options.shard_size)
    kept, rebuilt = _reusable_records(out, tasks, num_classes, options.workers)
    pending = set(required) if (out / STATE_DIR / outdir.ASIDE).is_dir() else set()
    report, by_name = _write_shards(recipe, raw, out, tasks, kept, options, on_progress, start,
                                    pending)
    report.rebuilt = rebuilt
    records = {name: [by_name[t.name] for t in tasks if t.split == name]
               for name in _ordered(splits)}
    _check_built_splits(records, skipped, required)
    report.manifest = _finish(out, head, records, skipped, num_classes)
    return report


def _repair(recipe: Recipe, raw: Path, out: Path, finished: dict[str, Any],
            splits: dict[str, list[Entry]], options: BuildOptions,
            on_progress: Callable[[int, int], None] | None, start: float) -> BuildReport:
    """Reuse the finished build of this very plan in ``out``, first building again each
    shard whose bytes are not those its manifest records (missing, cut or changed)."""
    listed = {s["name"]: s for entry in finished["splits"].values() for s in entry["shards"]}
    with ThreadPoolExecutor(options.workers) as pool:  # hashing releases the GIL
        whys = pool.map(lambda s: shard_mismatch(out / s["name"], s["bytes"], s["sha256"]),
                        listed.values())
        damaged = {name: why for name, why in zip(listed, whys) if why}
    tasks = {task.name: task for task in shard_tasks(splits, options.shard_size)}
    if set(damaged) - set(tasks):
        raise BuildError(f"{out / spec.MANIFEST_NAME} lists shards that this plan does not "
                         f"make ({', '.join(sorted(set(damaged) - set(tasks))[:3])}); run with "
                         "--overwrite to build it again")
    report, records = _write_shards(recipe, raw, out, [tasks[n] for n in damaged], {},
                                    options, on_progress, start, set())
    for name in damaged:
        if any(records[name][k] != listed[name][k] for k in ("num_samples", "bytes",
                                                                    "sha256")):
            raise BuildError(f"shard {name}, built again, differs from its record in "
                             f"{spec.MANIFEST_NAME} (the decoders here give other bytes than "
                             "the build's); run with --overwrite to build the dataset again")
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    report.manifest, report.rebuilt = finished, damaged
    report.resumed_shards = len(listed) - len(damaged)
    return report


def _write_shards(recipe: Recipe, raw: Path, out: Path, tasks: list[ShardTask],
                  kept: dict[str, dict[str, Any]], options: BuildOptions,
                  on_progress: Callable[[int, int], None] | None, start: float,
                  pending: set[str]) -> tuple[BuildReport, dict[str, dict[str, Any]]]:
    """Build each of ``tasks`` whose record is not in ``kept``; returns the report and
    every task's record, by shard name. Once each split in ``pending`` has a finished shard with
    samples, the build that --overwrite moved aside is dropped."""
    todo = [task for task in _build_order(tasks) if task.name not in kept]
    total = sum(len(task.entries) for task in tasks)
    report = BuildReport(manifest={}, out=out, resumed_shards=len(tasks) - len(todo),
                         processed=sum(len(task.entries) for task in todo))
    done = total - report.processed

    def sample_done(count: int = 1) -> None:
        nonlocal done
        if report.first_sample_s is None:
            report.first_sample_s = time.perf_counter() - start
        done += count
        if on_progress:
            on_progress(done, total)

    records, split_of = dict(kept), {task.name: task.split for task in tasks}
    context = (recipe, raw, out, len(recipe.classes), options.strict, options.raw_hash)
    for record in _run_shards(todo, context, min(options.workers, len(todo)), sample_done,
                              report):
        records[record["name"]] = record
        if pending and record["num_samples"]:
            pending.discard(split_of[record["name"]])
            if not pending:
                outdir.drop_aside(out)
    return report, records


def _build_order(tasks: list[ShardTask]) -> list[ShardTask]:
    """The first shard of every split, then the others: a build that replaces another
    learns early whether every split gets samples, and drops the old build sooner."""
    return [t for t in tasks if t.index == 0] + [t for t in tasks if t.index != 0]


def _check_built_splits(records: dict[str, list[dict[str, Any]]], skipped: list[dict[str, Any]],
                        required: set[str]) -> None:
    """Refuse to finish a build whose skipped samples leave a split it must fill empty (a
    class losing its samples to bad media is recorded in ``skipped``, not refused)."""
    counts = {name: [sum(r["num_samples"] for r in split)] for name, split in records.items()}
    gap = empty_splits(counts, required)
    if gap:
        every = skipped + [s for split in records.values() for r in split for s in r["skipped"]]
        reason, count = Counter(s["reason"] for s in every).most_common(1)[0]
        raise BuildError(f"{gap} once the bad samples are skipped ({len(every)} skipped, "
                         f"{count} for '{reason}'); fix or replace those raw files (--strict "
                         "stops at the first and names it), then build again with --overwrite")


def _run_shards(tasks: list[ShardTask], context: tuple, workers: int,
                sample_done: Callable[[int], None], report: BuildReport,
                ) -> Iterator[dict[str, Any]]:
    """Build ``tasks`` here and, once the work left is worth it, on ``workers - 1`` more
    processes (the longest shards first, so that none is left alone at the end); yields
    their records and sets ``report.workers``. ``sample_done(n)`` hears of every sample
    done, in any process."""
    if workers <= 1:
        _init_worker(*context, sample_done)
        yield from map(_build_shard, tasks)
        return
    queue = deque(sorted(tasks, key=lambda task: -len(task.entries)))
    pool = _ShardPool(context, workers - 1, queue, sample_done)
    _init_worker(*context, pool.sample_done_here)
    try:
        while queue or pool.in_flight:
            if queue:
                pool.finished.append(_build_shard(queue.popleft()))
            else:
                pool.service(wait_s=PROGRESS_POLL_S)
            yield from pool.take_finished()
    finally:
        report.workers = 1 + pool.stop()


@dataclass
class _Worker:
    """A worker process, this process's end of its pipe, and what it is doing."""

    process: multiprocessing.process.BaseProcess
    conn: Connection
    ready: bool = False
    busy: bool = False


class _ShardPool:
    """Worker processes that build the shards this process hands them, one at a time.

    This process builds shards too, so a build never waits for the workers to start (they
    import torch and PyAV first), and it starts them only when the work left is worth it,
    so a small build is not slower with more workers. It services the workers (progress,
    records, errors, new shards) between its own samples.
    Hand-made rather than a multiprocessing or concurrent.futures pool for those reasons
    and one more: each worker has its own pipe, so a worker that dies is a BuildError,
    never a hang. On a worker's error the shards under way are finished and recorded (kept
    for a resume), no other is started, and the error is raised here; on an error of this
    process (or Ctrl-C) the workers are ended and their partial files removed.
    """

    def __init__(self, context: tuple, size: int, queue: deque[ShardTask],
                 sample_done: Callable[[int], None]) -> None:
        self.out: Path = context[2]
        self.context, self.size = context, size
        self.queue, self.sample_done = queue, sample_done
        self.left = sum(len(task.entries) for task in queue)  # samples not yet done
        self.done_here, self.first_here = 0, time.perf_counter()
        self.workers: list[_Worker] = []
        self.finished: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.started = False
        self.stopping = threading.Event()

    def _start_if_worth_it(self) -> None:
        """Start the workers when the work left would take this process alone longer than
        WORKER_START_MIN_S (estimated from its first PROBE_SAMPLES)."""
        if self.started or self.done_here < PROBE_SAMPLES:
            return
        per_sample = (time.perf_counter() - self.first_here) / self.done_here
        if per_sample * self.left > WORKER_START_MIN_S:
            self.start()

    def start(self) -> None:
        """Start the workers, off this thread: Process.start() waits for the fork
        server's imports."""
        self.started = True
        threading.Thread(target=self._start, args=(self.context, self.size), daemon=True).start()

    @property
    def in_flight(self) -> int:
        return sum(w.busy for w in list(self.workers))

    def _start(self, context: tuple, size: int) -> None:
        """Start ``size`` workers, one after the other; none once the pool is stopping."""
        server = worker_context()
        for _ in range(size):
            here, there = server.Pipe()
            process = server.Process(target=_pool_worker, args=(context, there), daemon=True)
            process.start()
            there.close()  # so that a worker's death reads as the end of its pipe
            self.workers.append(_Worker(process, here))
            if self.stopping.is_set():
                process.terminate()
                return

    def sample_done_here(self) -> None:
        """One sample of this process's shard is done: count it and service the workers."""
        self.sample_done(1)
        self.done_here, self.left = self.done_here + 1, self.left - 1
        self._start_if_worth_it()
        self.service(wait_s=0.0)

    def service(self, wait_s: float) -> None:
        """Read the workers' messages (waiting up to ``wait_s`` for the first), then hand
        each idle worker the next shard."""
        workers = {w.conn: w for w in list(self.workers) if not w.conn.closed}
        if not workers:  # none started yet (or every one has stopped)
            if wait_s > 0:  # sleep(0) is a system call: 0.1 ms a sample on a small build
                time.sleep(wait_s)
            return
        readable = connection_wait(list(workers), wait_s)
        while readable:
            for conn in readable:
                self._receive(workers[conn])
            readable = connection_wait([c for c in workers if not c.closed], 0)
        for worker in workers.values():
            if worker.ready and not worker.busy and self.queue and self.error is None:
                worker.conn.send(self.queue.popleft())
                worker.busy = True

    def _receive(self, worker: _Worker) -> None:
        """One message of a worker: ``sample`` (count), ``ready``, ``record`` or ``error``;
        the end of its pipe is its death."""
        try:
            kind, value = worker.conn.recv()
        except (EOFError, OSError):
            worker.conn.close()
            if worker.busy:
                self.error = self.error or BuildError(
                    "a build worker process died (killed, or out of memory); the shards "
                    "finished are kept: run the same command again to resume, with fewer "
                    "--workers if memory is short")
            worker.ready = worker.busy = False
            return
        if kind == "sample":
            self.sample_done(value)
            self.left -= value
        elif kind == "ready":
            worker.ready = True
        elif kind == "record":
            worker.busy = False
            self.finished.append(value)
        else:
            worker.busy = worker.ready = False  # the worker has stopped
            self.error = self.error or value

    def take_finished(self) -> list[dict[str, Any]]:
        """The records finished since the last call; raises a worker's error instead, once
        no shard is under way any more."""
        if self.error is not None:
            self.queue.clear()
            while self.in_flight:
                self.service(wait_s=PROGRESS_POLL_S)
            raise self.error
        finished, self.finished = self.finished, []
        return finished

    def stop(self) -> int:
        """End every worker (idle ones are told to, the others terminated), then remove
        the partial files of terminated ones; returns how many had started. Workers still
        starting are ended as they start, without waiting for them."""
        self.stopping.set()
        workers = list(self.workers)
        for worker in workers:
            with contextlib.suppress(OSError):
                worker.conn.send(None)
        for worker in workers:
            worker.process.join(timeout=PROGRESS_POLL_S)
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join()
            worker.conn.close()
        for tmp in [*self.out.glob(f"*{TMP_SUFFIX}"),
                    *(self.out / STATE_DIR).glob(f"*{TMP_SUFFIX}")]:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return len(workers)


def _pool_worker(context: tuple, conn: Connection) -> None:
    """A worker process: build the shards it is handed until told to stop (None) or its
    parent is gone. Ctrl-C is the parent's to handle: it ends the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(*context, lambda: conn.send(("sample", 1)))
    with contextlib.suppress(EOFError, OSError):
        conn.send(("ready", None))
        for task in iter(conn.recv, None):
            try:
                record = _build_shard(task)
            except Exception as err:  # noqa: BLE001 - passed to the parent, which raises it
                conn.send(("error", err))
                return
            conn.send(("record", record))


def _ordered(splits: dict[str, list[Entry]]) -> list[str]:
    return [s for s in spec.SPLIT_NAMES if s in splits] + sorted(set(splits) - set(spec.SPLIT_NAMES))


def _strict_message(record: dict[str, Any], sources: dict[str, str] | None = None) -> str:
    detail = f" ({record['detail']})" if record.get("detail") else ""
    files = f" [files: {', '.join(sources.values())}]" if sources else ""
    return (f"sample {record['id']}{files}: {record['reason']}{detail}; fix or remove its "
            "files, or build without --strict to skip it and record why")


def _finish(out: Path, head: dict[str, Any], records: dict[str, list[dict[str, Any]]],
            skipped: list[dict[str, Any]], num_classes: int) -> dict[str, Any]:
    """Write manifest.json atomically, with its identity fields, then drop the records."""
    every = [record for split in records.values() for record in split]
    every_skip = skipped + [s for record in every for s in record["skipped"]]
    hashes = {rel: digest for record in every for rel, digest in record["hashes"].items()}
    manifest = {
        **{k: head[k] for k in ("spec_version", "dataset", "classes", "modalities")},
        "splits": {name: split_entry(split, num_classes) for name, split in records.items()},
        "skipped": sorted(every_skip, key=lambda s: (s["split"] or "", s["id"])),
        "sources": {**head["sources"],
                    "raw": rawhash.raw_content(hashes, head["sources"]["build"]["raw_hash"])},
        "fingerprint": "",
        "tool_version": head["tool_version"],
    }
    manifest["fingerprint"] = spec.compute_fingerprint(manifest)
    spec.check_manifest(manifest, str(out / spec.MANIFEST_NAME))
    _atomic_write(out / spec.MANIFEST_NAME,
                  json.dumps(manifest, indent=2, ensure_ascii=False).encode() + b"\n")
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    return manifest
