"""Parallel, resumable, deterministic shard writing, and the manifest.

Samples are processed in a fixed order (split, then key) by a process pool whose results
come back in that order, so shard contents never depend on timing or worker count. Each
finished shard is renamed into place and recorded in ``<out>/.build/``; a build started
again skips every recorded shard and continues with the first unprocessed sample.
``manifest.json`` is written last, atomically, and then the records are removed.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ccat.data import spec
from preprocess import __version__ as TOOL_VERSION
from preprocess.datasets import Recipe
from preprocess.media import MediaError
from preprocess.splits import Entry, SplitError, assign_splits, file_sha256

STATE_DIR = ".build"
CHUNKSIZE = 4  # samples per pool task: amortizes IPC without hurting load balance


class BuildError(RuntimeError):
    """A build cannot go on; the message names the thing and the fix."""


@dataclass(frozen=True)
class BuildOptions:
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    shard_size: int = 256
    workers: int = 1
    strict: bool = False


@dataclass
class BuildReport:
    """What a build did, for the summary table."""

    manifest: dict[str, Any]
    processed: int = 0
    resumed_shards: int = 0
    seconds: float = 0.0
    unlisted: int = 0
    out: Path = Path(".")

    @property
    def clips_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Result:
    """The outcome of processing one sample in a worker."""

    split: str
    key: str
    label: int
    members: dict[str, bytes] | None = None
    reason: str = ""
    detail: str = ""
    sources: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- worker side

_WORKER: dict[str, Any] = {}


def _init_worker(recipe: Recipe, raw: Path) -> None:
    import torch

    torch.set_num_threads(1)  # one process per core; intra-op threads would oversubscribe
    _WORKER.update(recipe=recipe, raw=raw)


def _process(task: tuple[str, Entry]) -> Result:
    split, entry = task
    recipe: Recipe = _WORKER["recipe"]
    try:
        members, meta = recipe.process(_WORKER["raw"], entry)
    except MediaError as err:
        return Result(split, entry.key, entry.label, reason=err.reason,
                      detail=_relative(err.detail), sources=entry.sources)
    except Exception as err:  # noqa: BLE001 - one bad file must never stop a build
        return Result(split, entry.key, entry.label, reason="unexpected error while decoding",
                      detail=_relative(f"{type(err).__name__}: {err}"), sources=entry.sources)
    meta = {"id": entry.key, "label": recipe.classes[entry.label], "sources": entry.sources,
            **meta}
    members[spec.LABEL_MEMBER] = spec.encode_label(entry.label)
    members[spec.META_MEMBER] = spec.encode_json(meta)
    return Result(split, entry.key, entry.label, members)


def _relative(detail: str) -> str:
    """Error details name files relative to the raw folder: manifests stay machine-free."""
    return detail.replace(f"{_WORKER['raw']}{os.sep}", "")


def _results(tasks: list[tuple[str, Entry]], recipe: Recipe, raw: Path,
             workers: int) -> Iterator[Result]:
    """Results in task order, from a pool of ``workers`` processes (or this one)."""
    if workers <= 1 or len(tasks) <= 1:
        _init_worker(recipe, raw)
        yield from map(_process, tasks)
        return
    with worker_context().Pool(workers, initializer=_init_worker,
                               initargs=(recipe, raw)) as pool:
        yield from pool.imap(_process, tasks, chunksize=CHUNKSIZE)


def worker_context() -> multiprocessing.context.BaseContext:
    """Workers fork from a clean, single-threaded server that has imported the decoders.

    Plain fork deadlocked: by then the parent may hold threads (codecs, BLAS, OpenMP) whose
    locks a forked child inherits taken; spawn would re-import torch and PyAV per worker.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["preprocess.writer"])
    return context


# ---------------------------------------------------------------- shard side


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class SplitWriter:
    """Fills the shards of one split in order and records each finished one."""

    split: str
    out: Path
    shard_size: int
    num_classes: int
    records: list[dict[str, Any]] = field(default_factory=list)
    pending: list[tuple[str, dict[str, bytes], int]] = field(default_factory=list)
    pending_skipped: list[dict[str, Any]] = field(default_factory=list)
    consumed: int = 0
    finished: bool = False

    def add(self, result: Result) -> None:
        self.consumed += 1
        if result.members is None:
            record = {"id": result.key, "split": self.split, "reason": result.reason}
            self.pending_skipped.append({**record, "detail": result.detail} if result.detail
                                        else record)
        else:
            self.pending.append((result.key, result.members, result.label))
        if len(self.pending) == self.shard_size:
            self._write_shard()

    def close(self) -> None:
        if self.pending:
            self._write_shard()
        end = {"consumed": self.consumed, "skipped": self.pending_skipped}
        _atomic_write(self._state_path(f"{self.split}.end"), spec.encode_json(end))
        self.finished = True

    def _write_shard(self) -> None:
        name = spec.shard_name(self.split, len(self.records))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, members, _ in self.pending:
                spec.write_sample(tar, key, members)
        data = buf.getvalue()
        counts = [0] * self.num_classes
        for _, _, label in self.pending:
            counts[label] += 1
        record = {"name": name, "num_samples": len(self.pending), "bytes": len(data),
                  "sha256": hashlib.sha256(data).hexdigest(), "class_counts": counts,
                  "consumed": self.consumed, "skipped": self.pending_skipped}
        _atomic_write(self.out / name, data)
        _atomic_write(self._state_path(name), spec.encode_json(record))
        self.records.append(record)
        self.pending, self.pending_skipped = [], []

    def _state_path(self, name: str) -> Path:
        return self.out / STATE_DIR / f"{name}.json"

    @classmethod
    def resume(cls, split: str, out: Path, shard_size: int, num_classes: int) -> "SplitWriter":
        """A writer that continues after the shards already recorded in ``out``."""
        writer = cls(split, out, shard_size, num_classes)
        while True:
            name = spec.shard_name(split, len(writer.records))
            state, shard = writer._state_path(name), out / name
            if not (state.is_file() and shard.is_file()):
                break
            record = json.loads(state.read_text())
            if shard.stat().st_size != record["bytes"]:
                break
            writer.records.append(record)
            writer.consumed = record["consumed"]
        end = writer._state_path(f"{split}.end")
        if end.is_file():
            tail = json.loads(end.read_text())
            if tail["consumed"] >= writer.consumed:
                writer.consumed, writer.pending_skipped = tail["consumed"], tail["skipped"]
                writer.finished = True
        return writer

    def manifest_entry(self) -> dict[str, Any]:
        shards = [{k: r[k] for k in ("name", "num_samples", "bytes", "sha256")}
                  for r in self.records]
        counts = [sum(r["class_counts"][c] for r in self.records) for c in range(self.num_classes)]
        return {"num_samples": sum(s["num_samples"] for s in shards), "shards": shards,
                "class_counts": counts}

    def skipped(self) -> list[dict[str, Any]]:
        return [s for r in self.records for s in r["skipped"]] + self.pending_skipped


# ---------------------------------------------------------------- the build


def plan(recipe: Recipe, raw: Path, split_files: dict[str, Path],
         options: BuildOptions) -> tuple[dict[str, Any], dict[str, list[Entry]], list[dict], int]:
    """Find samples and assign splits: ``(manifest head, splits, skipped, unlisted)``.

    The head holds every manifest key but ``splits`` and ``skipped``, fingerprint included.
    """
    found, unusable = recipe.find(raw)
    listed = {name: recipe.read_split_file(path) for name, path in sorted(split_files.items())}
    _check_disjoint(listed, split_files)
    splits, missing = assign_splits(found, listed or None, seed=options.seed,
                                    val_fraction=options.val_fraction,
                                    test_fraction=options.test_fraction)
    unusable, missing = _explain_missing(unusable, missing)
    in_splits = {key for rows in listed.values() for key, _ in rows}
    unlisted = len(set(found) - in_splits) if listed else 0
    head = {
        "spec_version": spec.SPEC_VERSION,
        "dataset": recipe.name,
        "classes": list(recipe.classes),
        "modalities": recipe.modalities(),
        "sources": {
            "split_files": {name: file_sha256(path) for name, path in sorted(split_files.items())},
            "split": {"seed": options.seed, "val_fraction": options.val_fraction,
                      "test_fraction": None if listed else options.test_fraction},
            "shard_size": options.shard_size,
            "build": {"workers": options.workers, "strict": options.strict},
        },
        "tool_version": TOOL_VERSION,
    }
    head["fingerprint"] = spec.compute_fingerprint({**head, "splits": {}, "skipped": []})
    return head, splits, unusable + missing, unlisted


def _explain_missing(unusable: list[dict], missing: list[dict]) -> tuple[list[dict], list[dict]]:
    """A listed id that the recipe found but could not use keeps the recipe's reason (and
    gets the split that lists it) instead of 'no media for this id'."""
    problems = {record["id"]: record for record in unusable}
    explained = []
    for record in missing:
        problem = problems.pop(record["id"], None)
        explained.append({**problem, "split": record["split"]} if problem else record)
    return list(problems.values()), explained


def _check_disjoint(listed: dict[str, list[tuple[str, int]]], files: dict[str, Path]) -> None:
    seen: dict[str, str] = {}
    for split, rows in listed.items():
        for key, _ in rows:
            if key in seen and seen[key] != split:
                raise SplitError(f"clip {key} is listed in both {files[seen[key]]} and "
                                 f"{files[split]}; a clip belongs to one split")
            seen[key] = split


def _prepare_out(out: Path, head: dict[str, Any]) -> dict[str, Any] | None:
    """Create ``out`` or check that what it holds is this same build (to resume).

    Returns the manifest when ``out`` already holds this build, finished.
    """
    state = out / STATE_DIR / "head.json"
    previous = None
    if (out / spec.MANIFEST_NAME).is_file():
        previous = json.loads((out / spec.MANIFEST_NAME).read_text())
    elif state.is_file():
        previous = json.loads(state.read_text())
    elif out.is_dir() and any(out.iterdir()):
        raise BuildError(f"{out} is not empty and holds no build of this toolkit; "
                         "choose an empty --out folder")
    if previous is not None and previous["fingerprint"] != head["fingerprint"]:
        changed = spec.diff_fingerprint_params(spec.fingerprint_params(previous),
                                               spec.fingerprint_params(head))
        raise BuildError(f"{out} already holds a build with other parameters "
                         f"({'; '.join(changed)}); choose another --out or delete that folder")
    if previous is not None and "splits" in previous:
        return previous
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    _atomic_write(state, spec.encode_json(head))
    return None


def build(recipe: Recipe, raw: Path, out: Path, split_files: dict[str, Path],
          options: BuildOptions, on_progress: Callable[[int, int], None] | None = None,
          ) -> BuildReport:
    """Build (or resume building) the shards of ``recipe`` from ``raw`` into ``out``.

    ``on_progress(done, total)`` is called as samples finish.
    """
    start = time.perf_counter()
    head, splits, skipped, unlisted = plan(recipe, raw, split_files, options)
    if options.strict and skipped:
        raise BuildError(_strict_message(skipped[0]))
    finished = _prepare_out(out, head)
    if finished is not None:
        return BuildReport(manifest=finished, out=out, unlisted=unlisted,
                           resumed_shards=sum(len(e["shards"]) for e in finished["splits"].values()),
                           seconds=time.perf_counter() - start)
    writers = {name: SplitWriter.resume(name, out, options.shard_size, len(recipe.classes))
               for name in _ordered(splits)}
    tasks = [(name, entry) for name, w in writers.items() if not w.finished
             for entry in splits[name][w.consumed:]]
    total = sum(len(v) for v in splits.values())
    done = total - len(tasks)
    report = BuildReport(manifest={}, out=out, unlisted=unlisted,
                         resumed_shards=sum(len(w.records) for w in writers.values()))
    for result in _results(tasks, recipe, raw, options.workers):
        if options.strict and result.members is None:
            raise BuildError(_strict_message({"id": result.key, "reason": result.reason,
                                              "detail": result.detail}, result.sources))
        writers[result.split].add(result)
        report.processed += 1
        done += 1
        if on_progress:
            on_progress(done, total)
    for writer in writers.values():
        if not writer.finished:
            writer.close()
    report.manifest = _finish(out, head, writers, skipped)
    report.seconds = time.perf_counter() - start
    return report


def _ordered(splits: dict[str, list[Entry]]) -> list[str]:
    return [s for s in spec.SPLIT_NAMES if s in splits] + sorted(set(splits) - set(spec.SPLIT_NAMES))


def _strict_message(record: dict[str, Any], sources: dict[str, str] | None = None) -> str:
    detail = f" ({record['detail']})" if record.get("detail") else ""
    files = f" [files: {', '.join(sources.values())}]" if sources else ""
    return (f"sample {record['id']}{files}: {record['reason']}{detail}; fix or remove its "
            "files, or build without --strict to skip it and record why")


def _finish(out: Path, head: dict[str, Any], writers: dict[str, SplitWriter],
            skipped: list[dict[str, Any]]) -> dict[str, Any]:
    """Write manifest.json atomically, then drop the resume records."""
    every_skip = skipped + [s for w in writers.values() for s in w.skipped()]
    manifest = {
        **{k: head[k] for k in ("spec_version", "dataset", "classes", "modalities")},
        "splits": {name: w.manifest_entry() for name, w in writers.items()},
        "skipped": sorted(every_skip, key=lambda s: (s["split"] or "", s["id"])),
        **{k: head[k] for k in ("sources", "fingerprint", "tool_version")},
    }
    spec.check_manifest(manifest, str(out / spec.MANIFEST_NAME))
    _atomic_write(out / spec.MANIFEST_NAME,
                  json.dumps(manifest, indent=2, ensure_ascii=False).encode() + b"\n")
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    return manifest
