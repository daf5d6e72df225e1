"""Content hashes of the raw files a build reads, taken from the bytes the decoders decode.

While a sample is processed (:func:`recording`), :func:`media_source` reads each media file
once into memory, hashes those bytes and hands them to the decoder, so the fingerprint's
raw-content hash costs no second pass over the file and is of exactly what was decoded.
A file read some other way (a recipe's text file, one above :data:`WHOLE_READ_MAX`) is
hashed from disk afterwards (:func:`source_hashes`).

The algorithm is named in the manifest by the key it writes under ``sources.raw``:
``{"num_files": n, "blake3": ...}`` since ``--raw-hash`` exists (BLAKE3 is a 256-bit
cryptographic hash like sha256, and faster on one core: 1.3x measured on 0.5 MB clips), or
``{"num_files": n, "sha256": ...}`` (the builds before it, and ``--raw-hash sha256``).
A build is always checked with the algorithm it recorded, so builds of either kind keep
verifying and being reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path
from typing import Any, Iterable, Iterator

import blake3

from ccat.data import spec

ALGORITHMS = ("blake3", "sha256")
DEFAULT = "blake3"
LEGACY = "sha256"  # what a manifest or plan record from before --raw-hash used
WHOLE_READ_MAX = 256 << 20  # bytes; a larger file is decoded from disk, hashed apart
BLOCK = 1 << 20

_RECORDING: list[tuple[str, dict[Path, str]]] = []  # the sample being processed, if any


def hasher(algorithm: str) -> Any:
    """A fresh hash object of ``algorithm`` (``update``, ``hexdigest``)."""
    return blake3.blake3(max_threads=1) if algorithm == "blake3" else hashlib.new(algorithm)


def digest(data: bytes, algorithm: str) -> str:
    """Hex digest of ``data``."""
    h = hasher(algorithm)
    h.update(data)
    return h.hexdigest()


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file's content, read in blocks."""
    h = hasher(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def recording(algorithm: str) -> Iterator[dict[Path, str]]:
    """While the block runs, :func:`media_source` hashes what it reads into the dict
    yielded (path -> digest). One sample at a time per process."""
    seen: dict[Path, str] = {}
    _RECORDING.append((algorithm, seen))
    try:
        yield seen
    finally:
        _RECORDING.pop()


def media_source(path: Path) -> str | io.BytesIO:
    """What a decoder should open for ``path``: inside :func:`recording`, the file's bytes
    (hashed as they are read), else the path itself. A file that cannot be read, or one
    larger than WHOLE_READ_MAX, is left to the decoder by path (it words the error)."""
    if not _RECORDING:
        return str(path)
    algorithm, seen = _RECORDING[-1]
    try:
        if path.stat().st_size > WHOLE_READ_MAX:
            return str(path)
        data = path.read_bytes()
    except OSError:
        return str(path)
    seen[path] = digest(data, algorithm)
    return io.BytesIO(data)


def source_hashes(raw: Path, relatives: Iterable[str], algorithm: str,
                  read: dict[Path, str] | None = None) -> dict[str, str]:
    """Digest of each of ``relatives`` (paths under ``raw``) that can be read: from ``read``
    (what :func:`recording` saw the decoders read), else from disk. A missing or unreadable
    file is left out: the decoder says which."""
    hashes = {}
    for rel in sorted(relatives):
        path = raw / rel
        if read and path in read:
            hashes[rel] = read[path]
            continue
        with contextlib.suppress(OSError):
            hashes[rel] = file_digest(path, algorithm)
    return hashes


def raw_content(hashes: dict[str, str], algorithm: str) -> dict[str, Any]:
    """``sources.raw``: the number of raw files read and, under the algorithm's name, its
    digest over the canonical JSON of their sorted ``[[relative path, digest], ...]``."""
    listing = spec.encode_json(sorted([path, value] for path, value in hashes.items()))
    return {"num_files": len(hashes), algorithm: digest(listing, algorithm)}


def algorithm_of(raw_entry: dict[str, Any]) -> str:
    """The algorithm a manifest's (checked) ``sources.raw`` was hashed with."""
    return next((name for name in ALGORITHMS if name in raw_entry), LEGACY)
