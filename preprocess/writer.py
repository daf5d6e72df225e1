"""Parallel, resumable, deterministic shard writing, and the manifest.

Samples are processed in a fixed order (split, then key) by a process pool whose results
come back in that order, so shard contents never depend on timing or worker count. Each
finished shard is renamed into place and recorded in ``<out>/.build/``, with the keys it holds
and the sha256 of every raw file read for it. A build started again continues with the
first unprocessed sample only when its plan (parameters, the samples of every split, the
raw files and the content of those already read) is the interrupted one's; otherwise it
refuses and says what changed. ``manifest.json`` is written last, atomically, with the
membership and raw-content hashes the fingerprint covers; then the records are removed.
A lock file in ``.build/`` keeps a second build out of the same folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ccat.data import kinds, shardio, spec
from ccat.errors import UserError
from preprocess import __version__ as TOOL_VERSION
from preprocess.datasets import Recipe
from preprocess.media import MediaError
from preprocess.splits import Entry, assign_splits, check_unique

STATE_DIR = ".build"
PLAN_NAME = "plan.json"  # the interrupted build's plan, in STATE_DIR
LOCK_NAME = "lock"  # flock-ed by the build writing into the folder, in STATE_DIR
LOCK_ATTEMPTS = 5  # a finishing build may remove the lock file between open and flock
TMP_SUFFIX = ".tmp"
CHUNKSIZE = 4  # samples per pool task: amortizes IPC without hurting load balance


class BuildError(UserError, RuntimeError):
    """A build cannot go on; the message names the thing and the fix."""


@dataclass(frozen=True)
class BuildOptions:
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    shard_size: int = 256
    workers: int = 1
    strict: bool = False
    overwrite: bool = False


@dataclass
class BuildReport:
    """What a build did, for the summary table."""

    manifest: dict[str, Any]
    processed: int = 0
    resumed_shards: int = 0
    seconds: float = 0.0
    unlisted: int = 0
    out: Path = Path(".")
    writers: dict[str, "SplitWriter"] = field(default_factory=dict)

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
    hashes: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- worker side

_WORKER: dict[str, Any] = {}


def _init_worker(recipe: Recipe, raw: Path) -> None:
    import torch

    torch.set_num_threads(1)  # one process per core; intra-op threads would oversubscribe
    _WORKER.update(recipe=recipe, raw=raw, modalities=recipe.modalities())


def _process(task: tuple[str, Entry]) -> Result:
    split, entry = task
    recipe: Recipe = _WORKER["recipe"]
    hashes: dict[str, str] = {}
    try:
        hashes.update(source_hashes(_WORKER["raw"], entry.sources.values()))
        members, meta = recipe.process(_WORKER["raw"], entry)
    except MediaError as err:
        return Result(split, entry.key, entry.label, reason=err.reason,
                      detail=_relative(err.detail), sources=entry.sources, hashes=hashes)
    except Exception as err:  # noqa: BLE001 - one bad file must never stop a build
        return Result(split, entry.key, entry.label, reason="unexpected error while decoding",
                      detail=_relative(f"{type(err).__name__}: {err}"), sources=entry.sources,
                      hashes=hashes)
    meta = {"id": entry.key, "label": recipe.classes[entry.label], "sources": entry.sources,
            **meta}
    members[spec.LABEL_MEMBER] = shardio.encode_label(entry.label)
    members[spec.META_MEMBER] = spec.encode_json(meta)
    kinds.check_written(entry.key, members, _WORKER["modalities"])  # a recipe bug stops the build
    return Result(split, entry.key, entry.label, members, hashes=hashes)


def source_hashes(raw: Path, relatives: Iterable[str]) -> dict[str, str]:
    """sha256 of each of ``relatives`` (paths under ``raw``) that can be read: the raw content
    a sample is read from. Hashing costs little next to decoding, and the bytes it reads
    are in the page cache when the decoder reads them."""
    hashes = {}
    for rel in sorted(relatives):
        with contextlib.suppress(OSError):  # missing or unreadable: the decoder says which
            hashes[rel] = spec.file_sha256(raw / rel)
    return hashes


def raw_content(hashes: dict[str, str]) -> dict[str, Any]:
    """``sources.raw``: the number of raw files read and the sha256 over the canonical JSON
    of their sorted ``[[relative path, content sha256], ...]``."""
    listing = spec.encode_json(sorted([path, digest] for path, digest in hashes.items()))
    return {"num_files": len(hashes), "sha256": hashlib.sha256(listing).hexdigest()}


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
    """Write ``path`` through a ``.tmp`` file renamed into place; on failure the partial
    file is removed and the fault is one BuildError sentence."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise write_error(err, path) from None


def write_error(err: OSError, path: Path) -> BuildError:
    """The sentence for an OSError met while writing ``path``."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return BuildError(f"the disk of {path.parent} is full (writing {path.name} failed, the "
                          "partial file is removed); free some space and run the same command "
                          "again to resume")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return BuildError(f"cannot write into {path.parent} ({err.strerror}); give --out a "
                          "folder you can write to")
    return BuildError(f"cannot write {path} ({err.strerror}); check the --out folder")


@dataclass
class SplitWriter:
    """Fills the shards of one split in order and records each finished one, with its
    keys and labels and the hashes of the raw files read for it."""

    split: str
    out: Path
    shard_size: int
    num_classes: int
    records: list[dict[str, Any]] = field(default_factory=list)
    pending: list[tuple[str, dict[str, bytes], int]] = field(default_factory=list)
    pending_skipped: list[dict[str, Any]] = field(default_factory=list)
    pending_hashes: dict[str, str] = field(default_factory=dict)
    consumed: int = 0
    finished: bool = False

    def add(self, result: Result) -> None:
        self.consumed += 1
        self.pending_hashes.update(result.hashes)
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
        end = {"consumed": self.consumed, "skipped": self.pending_skipped,
               "hashes": self.pending_hashes}
        _atomic_write(self._state_path(f"{self.split}.end"), spec.encode_json(end))
        self.finished = True

    def _write_shard(self) -> None:
        name = spec.shard_name(self.split, len(self.records))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, members, _ in self.pending:
                shardio.write_sample(tar, key, members)
        data = buf.getvalue()
        counts = [0] * self.num_classes
        for _, _, label in self.pending:
            counts[label] += 1
        record = {"name": name, "num_samples": len(self.pending), "bytes": len(data),
                  "sha256": hashlib.sha256(data).hexdigest(), "class_counts": counts,
                  "consumed": self.consumed, "skipped": self.pending_skipped,
                  "members": [[key, label] for key, _, label in self.pending],
                  "hashes": self.pending_hashes}
        _atomic_write(self.out / name, data)
        _atomic_write(self._state_path(name), spec.encode_json(record))
        self.records.append(record)
        self.pending, self.pending_skipped, self.pending_hashes = [], [], {}

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
                writer.pending_hashes, writer.finished = tail["hashes"], True
        return writer

    def manifest_entry(self) -> dict[str, Any]:
        shards = [{k: r[k] for k in ("name", "num_samples", "bytes", "sha256")}
                  for r in self.records]
        counts = [sum(r["class_counts"][c] for r in self.records) for c in range(self.num_classes)]
        members = [row for r in self.records for row in r["members"]]
        return {"num_samples": sum(s["num_samples"] for s in shards), "shards": shards,
                "class_counts": counts, "membership_sha256": spec.membership_sha256(members)}

    def hashes(self) -> dict[str, str]:
        """sha256 of every raw file read for this split's samples so far."""
        every: dict[str, str] = {}
        for record in self.records:
            every.update(record["hashes"])
        return {**every, **self.pending_hashes}

    def skipped(self) -> list[dict[str, Any]]:
        return [s for r in self.records for s in r["skipped"]] + self.pending_skipped


# ---------------------------------------------------------------- the plan


def plan(recipe: Recipe, raw: Path, split_files: dict[str, Path],
         options: BuildOptions) -> tuple[dict[str, Any], dict[str, list[Entry]], list[dict], int]:
    """Find samples and assign splits: ``(manifest head, splits, skipped, unlisted)``.

    The head holds every manifest key but ``splits``, ``skipped`` and the identity fields
    that only the build itself learns (``sources.raw``, ``fingerprint``).
    """
    found, unusable = recipe.find(raw)
    listed = {name: recipe.read_split_file(path) for name, path in sorted(split_files.items())}
    check_unique(listed, split_files)
    splits, missing = assign_splits(found, listed or None, seed=options.seed,
                                    val_fraction=options.val_fraction,
                                    test_fraction=options.test_fraction)
    unusable, missing = _explain_missing(unusable, missing)
    in_splits = {row.key for rows in listed.values() for row in rows}
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
            "build": {"workers": options.workers, "strict": options.strict},
        },
        "tool_version": TOOL_VERSION,
    }
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
    return {"params": params, "splits": members, "files": files}


def _param_changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Differing parameters of two manifest-like dicts, identity hashes left out."""
    def params(tree: dict[str, Any]) -> dict[str, Any]:
        flat = spec.fingerprint_params({**tree, "splits": {}})
        return {k: v for k, v in flat.items() if not k.startswith("sources.raw.")}

    return spec.diff_fingerprint_params(params(before), params(now))


def _hash_files(raw: Path, relatives: Iterable[str], workers: int) -> dict[str, str]:
    """sha256 of raw files on ``workers`` threads (hashlib releases the GIL)."""
    relatives = sorted(relatives)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        digests = pool.map(lambda rel: source_hashes(raw, [rel]), relatives)
    return {rel: digest for found in digests for rel, digest in found.items()}


def _interrupted_changes(old: dict[str, Any], new: dict[str, Any], recorded: dict[str, str],
                         raw: Path, workers: int) -> list[str]:
    """What differs between an interrupted build's plan and this one, in words."""
    changes = _param_changes(old["params"], new["params"])
    old_files, new_files = set(old["files"]), set(new["files"])
    now = _hash_files(raw, set(recorded) & new_files, workers)
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
    """What differs between a finished build's manifest and this plan, in words."""
    sources = previous.get("sources")
    old_raw = sources.get("raw") if isinstance(sources, dict) else None
    if not isinstance(old_raw, dict) or previous.get("spec_version") != spec.SPEC_VERSION:
        return [f"it is a spec v{previous.get('spec_version', '?')} build, which records no "
                "raw-content hash"]
    try:
        changes = _param_changes(previous, head)
    except (KeyError, TypeError, AttributeError):
        return ["its manifest.json is not a complete spec manifest"]
    if changes:
        return changes
    now = raw_content(_hash_files(raw, new["files"], workers))
    if now != old_raw:
        changes.append(f"raw files: {old_raw.get('num_files')} then, {now['num_files']} now, "
                       "their content differs")
    return changes


# ---------------------------------------------------------------- the --out folder


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold ``out/.build/lock`` (flock) for the block: a second build into ``out`` fails at
    once; the lock of a killed build dies with its process."""
    _make_folder(out)
    lock = out / STATE_DIR / LOCK_NAME
    fd = _acquire(lock, out)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if os.listdir(lock.parent) == [LOCK_NAME]:  # nothing to resume: leave no trace
                shutil.rmtree(lock.parent)
        os.close(fd)


def _acquire(lock: Path, out: Path) -> int:
    """The open, flock-ed descriptor of ``lock``, holding this process's id."""
    for _ in range(LOCK_ATTEMPTS):
        _make_folder(lock.parent)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue  # a finishing build removed .build between mkdir and open
        except OSError as err:
            raise write_error(err, lock) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise BuildError(f"another ccat-data build (process {holder}) is writing into "
                             f"{out}; wait for it to finish or choose another --out") from None
        if lock.exists() and os.stat(lock).st_ino == os.fstat(fd).st_ino:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)  # for the message of a build refused
            except OSError as err:
                os.close(fd)
                raise write_error(err, lock) from None
            return fd
        os.close(fd)  # locked a file that a finishing build has just removed
    raise BuildError(f"could not lock {lock}; run the build again")


def _make_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise BuildError(f"--out {folder} is a file, not a folder; give a folder (new, empty "
                         "or holding a build)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(err, folder) from None


def _is_build_file(name: str) -> bool:
    base = name.removesuffix(TMP_SUFFIX)
    return base == spec.MANIFEST_NAME or bool(spec.SHARD_PATTERN.match(base))


def _clear(out: Path) -> None:
    """Remove a previous build's files (manifest first) and resume records; keep the lock."""
    names = sorted(os.listdir(out), key=lambda n: n != spec.MANIFEST_NAME)
    try:
        for name in names:
            if _is_build_file(name):
                (out / name).unlink()
        for path in (out / STATE_DIR).iterdir():
            if path.name != LOCK_NAME:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    except OSError as err:
        raise write_error(err, out / STATE_DIR) from None


def _prepare_out(out: Path, head: dict[str, Any], new_plan: dict[str, Any], raw: Path,
                 options: BuildOptions) -> dict[str, Any] | None:
    """Check that ``out`` may take this build, starting it afresh or resuming it.

    Returns the manifest when ``out`` already holds this build, finished. Refuses (one
    sentence) a folder holding other files, another finished build or another plan.
    """
    foreign = sorted(n for n in os.listdir(out) if n != STATE_DIR and not _is_build_file(n))
    if foreign:
        raise BuildError(f"{out} holds files that are not a build of this toolkit "
                         f"({', '.join(foreign[:3])}); choose an empty --out folder")
    if not options.overwrite:
        finished, refusal = _previous_build(out, head, new_plan, raw, options.workers)
        if refusal:
            raise BuildError(f"{out} {refusal}; run with --overwrite to replace it, or choose "
                             "another --out")
        return finished
    _clear(out)
    _atomic_write(out / STATE_DIR / PLAN_NAME, spec.encode_json(new_plan))
    return None


def _previous_build(out: Path, head: dict[str, Any], new_plan: dict[str, Any], raw: Path,
                    workers: int) -> tuple[dict[str, Any] | None, str]:
    """``(finished manifest to reuse, "")``, ``(None, why out cannot take this build)``, or
    ``(None, "")`` to go on: resuming the same plan, or starting in an empty folder."""
    state = out / STATE_DIR
    if (out / spec.MANIFEST_NAME).is_file():
        previous = _read_json(out / spec.MANIFEST_NAME)
        changes = _finished_changes(previous, head, new_plan, raw, workers) if previous \
            else ["its manifest.json is unreadable"]
        if changes:
            return None, f"already holds a finished build of other data ({'; '.join(changes)})"
        return previous, ""
    if (state / PLAN_NAME).is_file():
        old = _read_json(state / PLAN_NAME)
        changes = _interrupted_changes(old, new_plan, _recorded_hashes(state), raw, workers) \
            if old and set(old) == set(new_plan) else ["its plan record is unreadable"]
        return None, (f"holds an interrupted build of other data ({'; '.join(changes)})"
                      if changes else "")
    if any(_is_build_file(n) for n in os.listdir(out)) or \
            any(p.name != LOCK_NAME for p in state.iterdir()):
        return None, "holds parts of an unfinished build whose plan is unknown"
    _atomic_write(state / PLAN_NAME, spec.encode_json(new_plan))
    return None, ""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _recorded_hashes(state: Path) -> dict[str, str]:
    """sha256 of the raw files an interrupted build has read, from its shard records."""
    recorded: dict[str, str] = {}
    for path in sorted(state.glob("*.json")):
        record = _read_json(path) if path.name != PLAN_NAME else None
        recorded.update((record or {}).get("hashes", {}))
    return recorded


# ---------------------------------------------------------------- the build


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
    with locked(out):
        finished = _prepare_out(out, head, plan_record(head, splits, raw), raw, options)
        if finished is not None:
            shutil.rmtree(out / STATE_DIR, ignore_errors=True)
            return BuildReport(manifest=finished, out=out, unlisted=unlisted,
                               resumed_shards=sum(len(e["shards"])
                                                  for e in finished["splits"].values()),
                               seconds=time.perf_counter() - start)
        report = _write_shards(recipe, raw, out, splits, options, on_progress)
        report.unlisted = unlisted
        report.manifest = _finish(out, head, report.writers, skipped)
    report.seconds = time.perf_counter() - start
    return report


def _write_shards(recipe: Recipe, raw: Path, out: Path, splits: dict[str, list[Entry]],
                  options: BuildOptions, on_progress: Callable[[int, int], None] | None,
                  ) -> BuildReport:
    """Process every sample not yet in a recorded shard and close every split."""
    writers = {name: SplitWriter.resume(name, out, options.shard_size, len(recipe.classes))
               for name in _ordered(splits)}
    tasks = [(name, entry) for name, w in writers.items() if not w.finished
             for entry in splits[name][w.consumed:]]
    total = sum(len(v) for v in splits.values())
    done = total - len(tasks)
    report = BuildReport(manifest={}, out=out, writers=writers,
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
    """Write manifest.json atomically, with its identity fields, then drop the records."""
    every_skip = skipped + [s for w in writers.values() for s in w.skipped()]
    hashes = {rel: digest for w in writers.values() for rel, digest in w.hashes().items()}
    manifest = {
        **{k: head[k] for k in ("spec_version", "dataset", "classes", "modalities")},
        "splits": {name: w.manifest_entry() for name, w in writers.items()},
        "skipped": sorted(every_skip, key=lambda s: (s["split"] or "", s["id"])),
        "sources": {**head["sources"], "raw": raw_content(hashes)},
        "fingerprint": "",
        "tool_version": head["tool_version"],
    }
    manifest["fingerprint"] = spec.compute_fingerprint(manifest)
    spec.check_manifest(manifest, str(out / spec.MANIFEST_NAME))
    _atomic_write(out / spec.MANIFEST_NAME,
                  json.dumps(manifest, indent=2, ensure_ascii=False).encode() + b"\n")
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    return manifest
