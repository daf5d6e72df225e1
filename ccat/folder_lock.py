"""One writer per folder: a lock file, held with ``flock``, that names its holder.

A folder that one process writes for a long time (a run folder for ``ccat train``) is
locked for the writer's whole life. The writer holds an exclusive :func:`fcntl.flock` on a
lock file in the folder and writes its process id and host into it, so that a second
writer is refused at once with a message naming the first. The kernel drops the lock when
the holder's process ends, however it ends, so a killed writer leaves no lock to clear by
hand. The holder removes the file when it releases it; an opener that raced with the
removal has locked a file that no longer has the name, notices, and tries again.

This is the design of ``preprocess.writer.locked`` for a build's ``--out``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path

ATTEMPTS = 5  # a releasing holder may remove the file between our open and our flock
# flock errors of file systems that have no locks (some network and FUSE mounts)
UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)
HOLDER_BYTES = 512


class Busy(Exception):
    """Another process holds the lock; ``holder`` says which ("process 12 on host a")."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def acquire(lock: Path) -> int | None:
    """The open descriptor of ``lock`` (created with its folder), flock-ed by this process,
    which it names; None where the file system cannot lock. Raises :class:`Busy` when another
    process holds it, OSError when the folder cannot be written."""
    for _ in range(ATTEMPTS):
        lock.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            continue  # a releasing holder removed the folder it had made
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise Busy(holder) from None
        except OSError as err:
            os.close(fd)
            if err.errno in UNSUPPORTED:
                return None
            raise
        if _still_named(lock, fd):
            return _sign(fd)
        os.close(fd)
    raise Busy("a process that keeps removing the lock file")


def release(lock: Path, fd: int | None) -> None:
    """Remove ``lock`` while still holding it, then let go."""
    if fd is None:
        return
    with contextlib.suppress(OSError):
        if _still_named(lock, fd):
            lock.unlink()
    os.close(fd)


def _sign(fd: int) -> int:
    """Write this process's id and host into the held lock file; returns ``fd``."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}".encode(), 0)
    except OSError:
        os.close(fd)
        raise
    return fd


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it."""
    words = os.pread(fd, HOLDER_BYTES, 0).decode(errors="replace").split()
    if len(words) != 2:
        return "a process that has not named itself yet"
    return f"process {words[0]} on host {words[1]}"


def _still_named(lock: Path, fd: int) -> bool:
    """Whether ``fd`` is still the file at ``lock`` (not one a releasing holder removed)."""
    try:
        named, held = os.stat(lock), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)
