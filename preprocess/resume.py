"""Resume: what an earlier build in ``--out`` leaves that this one may keep.

A build started again goes on only when its plan (parameters, the samples of every split,
the raw files and the content of those already read) is the interrupted one's
(:func:`previous_build`), and keeps only the shards whose bytes match their record
(:func:`reusable_records`); otherwise it refuses and says what changed. A finished build
of the same plan is reused as it is, once its raw content is checked.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

from ccat.data import spec
from preprocess import outdir, rawhash
from preprocess.outdir import STATE_DIR, atomic_write, record_path
from preprocess.plan import PLAN_NAME, ShardTask

RECORD_KEYS = ("name", "num_samples", "bytes", "sha256", "class_counts", "skipped", "members",
               "hashes")


def reusable_records(out: Path, tasks: list[ShardTask], num_classes: int, workers: int,
                      ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The records an interrupted run of this plan left whose shards can be kept: the
    record is whole and its tar's size and sha256 are the recorded ones. Returns them by
    shard name, and the shards that have a record but cannot be kept, with why (they are
    built again)."""
    def look(task: ShardTask) -> tuple[dict[str, Any] | None, str]:
        path = record_path(out, task.name)
        if not path.is_file():
            return None, ""
        record = read_json(path)
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



def previous_build(out: Path, head: dict[str, Any], new_plan: dict[str, Any], raw: Path,
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
        changes = _interrupted_changes(read_json(state / PLAN_NAME), new_plan,
                                       _recorded_hashes(state, shards), raw, workers)
        return None, (f"holds an interrupted build of other data ({'; '.join(changes)})"
                      if changes else "")
    if any(outdir.is_build_file(n) for n in os.listdir(out)) or outdir.state_entries(out):
        return None, "holds parts of an unfinished build whose plan is unknown"
    atomic_write(state / PLAN_NAME, spec.encode_json(new_plan))
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


def read_json(path: Path) -> dict[str, Any] | None:
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
        hashes = (read_json(path) or {}).get("hashes")
        if isinstance(hashes, dict):
            recorded.update((k, v) for k, v in hashes.items() if isinstance(v, str))
    return recorded

