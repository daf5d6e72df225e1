"""Shard encoding: one planned shard's samples decoded, in order, into its tar and its record.

:meth:`Encoder.shard` is the whole of what a process building a shard does, whichever
process it is (:mod:`preprocess.schedule` decides that): it decodes the shard's samples in
plan order, streams the tar through :func:`ccat.fileio.atomic_writer` while hashing it,
and writes the shard's record into ``<out>/.build/`` (keys, labels, skipped samples with
reasons, the sha256 of every raw file read, the tar's size and sha256). A shard's bytes
therefore depend on the plan alone, never on timing or on which process built it. A bad
sample is skipped and recorded (``--strict``: the build stops, naming it); a shard whose
samples are all bad writes no tar.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ccat import fileio
from ccat.data import kinds, shardio, spec
from preprocess import rawhash
from preprocess.datasets import Recipe
from preprocess.media import MediaError
from preprocess.outdir import BuildError, atomic_write, record_path, write_error
from preprocess.plan import ShardTask
from preprocess.splits import Entry


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


def single_threaded() -> None:
    """One process per core: torch's intra-op threads would oversubscribe the cores."""
    import torch

    torch.set_num_threads(1)


@dataclass(frozen=True)
class Encoder:
    """What every process building shards of one build shares (it travels to the workers
    once, when they start)."""

    recipe: Recipe
    raw: Path
    out: Path
    num_classes: int
    strict: bool
    raw_hash: str

    def shard(self, task: ShardTask, sample_done: Callable[[], None]) -> dict[str, Any]:
        """Build one shard from its planned samples and record it; returns the record.
        ``sample_done()`` is called once per sample, as it is written (or skipped)."""
        path = self.out / task.name
        counts, members, skipped, hashes = [0] * self.num_classes, [], [], {}
        modalities = self.recipe.modalities()
        try:
            with fileio.atomic_writer(path) as file:
                sink = _HashingFile(file)
                with tarfile.open(fileobj=sink, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                    for entry in task.entries:
                        result = self.process(entry, modalities)
                        hashes.update(result.hashes)
                        if result.members is None:
                            skipped.append(self.skip_record(task.split, result))
                        else:
                            shardio.write_sample(tar, result.key, result.members)
                            members.append([result.key, result.label])
                            counts[result.label] += 1
                        sample_done()
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
        atomic_write(record_path(self.out, task.name), spec.encode_json(record))
        return record

    def process(self, entry: Entry, modalities: Any) -> Result:
        """Process one sample; the raw files it reads are hashed as the decoders read them
        (:mod:`preprocess.rawhash`), any other of its files afterwards, from disk."""
        with rawhash.recording(self.raw_hash) as read:
            result = self._decode(entry, modalities)
        result.hashes = rawhash.source_hashes(self.raw, entry.sources.values(), self.raw_hash,
                                              read)
        return result

    def _decode(self, entry: Entry, modalities: Any) -> Result:
        recipe = self.recipe
        try:
            members, meta = recipe.process(self.raw, entry)
        except MediaError as err:
            return Result(entry.key, entry.label, reason=err.reason,
                          detail=self._relative(err.detail), sources=entry.sources)
        except Exception as err:  # noqa: BLE001 - one bad file must never stop a build
            return Result(entry.key, entry.label, reason="unexpected error while decoding",
                          detail=self._relative(f"{type(err).__name__}: {err}"),
                          sources=entry.sources)
        meta = {"id": entry.key, "label": recipe.classes[entry.label], "sources": entry.sources,
                **meta}
        members[spec.LABEL_MEMBER] = shardio.encode_label(entry.label)
        members[spec.META_MEMBER] = spec.encode_json(meta)
        kinds.check_written(entry.key, members, modalities)  # a recipe bug stops the build
        return Result(entry.key, entry.label, members)

    def _relative(self, detail: str) -> str:
        """Error details name files relative to the raw folder: manifests stay machine-free."""
        return detail.replace(f"{self.raw}{os.sep}", "")

    def skip_record(self, split: str, result: Result) -> dict[str, Any]:
        """The manifest's record of a bad sample; under --strict, the build stops instead."""
        if self.strict:
            raise BuildError(strict_message({"id": result.key, "reason": result.reason,
                                             "detail": result.detail}, result.sources))
        record = {"id": result.key, "split": split, "reason": result.reason}
        return {**record, "detail": result.detail} if result.detail else record


def strict_message(record: dict[str, Any], sources: dict[str, str] | None = None) -> str:
    """The sentence that stops a ``--strict`` build at the bad sample ``record``."""
    detail = f" ({record['detail']})" if record.get("detail") else ""
    files = f" [files: {', '.join(sources.values())}]" if sources else ""
    return (f"sample {record['id']}{files}: {record['reason']}{detail}; fix or remove its "
            "files, or build without --strict to skip it and record why")


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
