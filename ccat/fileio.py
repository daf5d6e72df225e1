"""The one atomic write: a file appears whole under its name or not at all.

Every file a reader must never see half of (a checkpoint, a manifest, a shard, an
``eval.json``, a cached shard) goes through :func:`atomic_writer`: the bytes go to a
temporary file in the target's own folder (so the rename stays on one filesystem), are
flushed and fsynced, the temporary file is renamed over the target, and the folder is
fsynced so that the rename itself survives a power cut. On any failure the temporary
file is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO, Iterator

TMP_MARK = ".tmp"  # temporary files are ".<name>.<pid>.tmp" beside their target


def temporary_name(target: Path) -> Path:
    """Where :func:`atomic_writer` writes ``target`` before the rename (hidden, per process)."""
    return target.with_name(f".{target.name}.{os.getpid()}{TMP_MARK}")


def fsync_folder(folder: Path) -> None:
    """Make a rename or creation inside ``folder`` durable (a no-op where folders cannot be
    opened, as on some network filesystems)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(target: str | Path) -> Iterator[BinaryIO]:
    """A binary file that becomes ``target`` when the block ends without error; on an
    error (an OSError such as a full disk, or anything else) it is removed, ``target`` is
    untouched and the error propagates for the caller to word."""
    target = Path(target)
    tmp = temporary_name(target)
    try:
        with open(tmp, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    fsync_folder(target.parent)


def write_bytes(target: str | Path, data: bytes) -> None:
    """``target`` holds ``data``, written atomically."""
    with atomic_writer(target) as out:
        out.write(data)


def write_text(target: str | Path, text: str) -> None:
    """``target`` holds ``text`` as UTF-8, written atomically."""
    write_bytes(target, text.encode("utf-8"))
