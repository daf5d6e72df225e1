"""Check a built dataset, a folder or the copy a server holds, against its manifest."""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from ccat.data import kinds, remote, shardio, spec
from ccat.errors import UserError


class VerifyError(UserError, RuntimeError):
    """The first shard or sample that does not match the manifest."""


CHUNK = 1 << 20


@dataclass
class VerifyReport:
    manifest: dict[str, Any]
    shards: int = 0
    samples: int = 0
    bytes: int = 0


@dataclass
class Source:
    """A build to verify: a folder, or a URL whose shards are read as the server sends them
    (copied into ``cache`` as they stream when one is given, for training to reuse)."""

    location: str
    manifest: dict[str, Any]
    cache: Path | None = None

    @property
    def is_remote(self) -> bool:
        return remote.is_remote(self.location)

    def where(self, shard: spec.ShardInfo) -> str:
        """How messages name ``shard``: its URL, or its file name in a local build."""
        return remote.url_of(self.location, shard.name) if self.is_remote else shard.name

    @contextlib.contextmanager
    def stream(self, shard: spec.ShardInfo) -> Iterator[tuple[BinaryIO, BinaryIO | None]]:
        """The shard's bytes as they are read, and the cache file they are copied to."""
        if not self.is_remote:
            path = Path(self.location) / shard.name
            if not path.is_file():
                raise VerifyError(f"{shard.name}: the file is missing from {self.location}")
            with open(path, "rb") as f:
                yield f, None
            return
        url = self.where(shard)
        with contextlib.ExitStack() as stack:
            sink = (stack.enter_context(remote.cache_writer(self.cache / shard.name))
                    if self.cache else None)
            # a body longer than the manifest's size is cut there and refused by open_stream
            yield stack.enter_context(remote.open_stream(url, shard.bytes)), sink


def open_source(location: str | Path, cache_dir: Path | None = None) -> Source:
    """The checked manifest of ``location``; for a URL, nothing is kept unless ``cache_dir``."""
    location = str(location)
    if not remote.is_remote(location):
        return Source(location, spec.load_manifest(Path(location)))
    manifest = remote.load_manifest(location)
    cache = remote.cache_folder(manifest, cache_dir) if cache_dir else None
    return Source(location, manifest, cache)


def verify(source: Source | Path | str,
           on_shard: Callable[[str], None] | None = None) -> VerifyReport:
    """Prove what docs/format.md ("What verify proves") lists: hash every shard as it is
    read (from the server, for a URL), decode every sample, check shapes, dtypes, counts,
    and that the keys and labels read are exactly the membership the fingerprint covers.

    Raises VerifyError naming the first shard (and sample) that does not hold.
    """
    if not isinstance(source, Source):
        source = open_source(source)
    manifest = source.manifest
    report = VerifyReport(manifest)
    seen: dict[str, str] = {}  # key -> where it was read, over every split
    for split, entry in manifest["splits"].items():
        rows: list[tuple[str, int]] = []
        for shard in spec.shards_of(manifest, split):
            here = _verify_shard(source, shard)
            _check_unseen(here, source.where(shard), seen)
            rows += here
            report.shards += 1
            report.samples += shard.num_samples
            report.bytes += shard.bytes
            if on_shard:
                on_shard(shard.name)
        _check_split(split, entry, rows, len(manifest["classes"]))
    if source.cache:
        remote.write_cached_manifest(source.cache, manifest)
    return report


def _check_unseen(rows: list[tuple[str, int]], where: str, seen: dict[str, str]) -> None:
    """No key of ``rows`` was read before, in this shard or another (of any split)."""
    for key, _ in rows:
        if key in seen:
            raise VerifyError(f"{where}: sample {key!r} is also in {seen[key]}; a key is in one "
                              "split, once: rebuild the dataset or fetch it again")
        seen[key] = where


def _check_split(split: str, entry: dict[str, Any], rows: list[tuple[str, int]],
                 num_classes: int) -> None:
    """The keys and labels read from ``split`` are the membership its fingerprint covers
    and count its class_counts."""
    if spec.membership_sha256(rows) != entry["membership_sha256"]:
        raise VerifyError(f"split {split}: its shards hold other samples or labels than the "
                          f"membership its fingerprint covers (splits.{split}."
                          "membership_sha256); rebuild the dataset or fetch it again")
    counted = Counter(label for _, label in rows)
    counted_list = [counted[c] for c in range(num_classes)]
    expected = entry.get("class_counts")
    if expected is not None and counted_list != expected:
        raise VerifyError(f"split {split}: class counts {counted_list} differ from the "
                          f"manifest's {expected}")


class _Hashing:
    """Reads a stream, hashing and counting every byte (and copying it to ``sink``)."""

    def __init__(self, stream: BinaryIO, sink: BinaryIO | None):
        self.stream, self.sink = stream, sink
        self.digest, self.size = hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.digest.update(data)
        self.size += len(data)
        if self.sink:
            self.sink.write(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


def _verify_shard(source: Source, shard: spec.ShardInfo) -> list[tuple[str, int]]:
    """``(key, label)`` of the shard's samples in file order; its size and sha256 decide
    first, then its samples, their count and its recorded membership."""
    where = source.where(shard)
    rows: list[tuple[str, int]] = []
    problem = None
    with source.stream(shard) as (stream, sink):
        hashed = _Hashing(stream, sink)
        try:
            for key, members in shardio.iter_tar_samples(hashed):
                rows.append((key, _verify_sample(key, members, source.manifest, where)))
        except spec.SpecError as err:
            problem = VerifyError(f"{where}: {err}")
        except VerifyError as err:
            problem = err
        hashed.drain()
        if hashed.size != shard.bytes:
            raise VerifyError(f"{where}: {hashed.size} bytes, the manifest says {shard.bytes}")
        if hashed.digest.hexdigest() != shard.sha256:
            raise VerifyError(f"{where}: sha256 differs from the manifest (the file changed "
                              "after the build); rebuild or fetch it again")
        if problem:
            raise problem
        if len(rows) != shard.num_samples:  # inside: a cached copy is kept only if it holds
            raise VerifyError(f"{where}: {len(rows)} samples, the manifest says "
                              f"{shard.num_samples}")
        _check_recorded(rows, shard, where)
    return rows


def _check_recorded(rows: list[tuple[str, int]], shard: spec.ShardInfo, where: str) -> None:
    """The samples read are the shard's recorded membership, in order (where recorded)."""
    if shard.membership is None:
        return  # a manifest from before builds recorded it: the split's hash decides
    fix = "rebuild the dataset or fetch it again"
    for (key, label), (want, want_label) in zip(rows, spec.parse_membership(shard.membership)):
        if key != want:
            raise VerifyError(f"{where}: holds sample {key!r} where the membership its "
                              f"fingerprint covers lists {want!r}; {fix}")
        if label != want_label:
            raise VerifyError(f"{where}: labels sample {key!r} {label}, where the membership "
                              f"its fingerprint covers says {want_label}; {fix}")


def _verify_sample(key: str, members: dict[str, bytes], manifest: dict[str, Any],
                   shard: str) -> int:
    where = f"{shard}, sample {key}"
    try:
        sample = kinds.decode_sample(key, members, manifest["modalities"])
    except spec.SpecError as err:  # it names the sample and the member
        raise VerifyError(f"{shard}: {err}") from None
    except Exception as err:  # noqa: BLE001 - any decode failure is a verify failure
        raise VerifyError(f"{where}: does not decode ({err})") from None
    for name, params in manifest["modalities"].items():
        problem = kinds.check_array(name, sample.data[name], params)
        if problem:
            raise VerifyError(f"{where}: {name} {problem}")
    if not 0 <= sample.label < len(manifest["classes"]):
        raise VerifyError(f"{where}: label {sample.label} is not a class index "
                          f"(0..{len(manifest['classes']) - 1})")
    return sample.label


def skipped_by_reason(manifest: dict[str, Any]) -> Counter[str]:
    return Counter(s["reason"] for s in manifest["skipped"])
