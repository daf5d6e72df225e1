"""Where a command may write: the one check that every command writing a file (eval,
probe, export, analyze, report, summary, results) makes for each file before any work, and
the one way those files are then written (atomically, a failure in one sentence).

An output is refused when it
- is an input of the command: the same file by path, through a symlink or a hard link;
- takes a name a run folder owns (``run_dir.OWNERS``: checkpoints, config, metrics, the
  TensorBoard folder; ``eval.json`` for every command but ``ccat eval``), wherever it is,
  or a hidden name in a run folder (its temporary files and lock);
- lies inside a run's ``tb/``, or beside a built dataset's ``manifest.json`` (a rebuild of
  that folder refuses files it did not write);
- is a folder or a file that is not a regular one (``/dev/null``, a pipe: the atomic
  rename would replace it), or goes into a folder that cannot be written: a file is
  created and removed in its nearest existing folder to find out, which a read-only file
  system or a missing permission refuses even to root where it would refuse the real
  write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from ccat import fileio, run_dir
from ccat.data.spec import MANIFEST_NAME
from ccat.errors import CcatError

WHY = {errno.EROFS: "is on a read-only file system", errno.EACCES: "is not writable",
       errno.EPERM: "is not writable", errno.ENOSPC: "is full",
       errno.EDQUOT: "is over its disk quota", errno.ENOTDIR: "is not a folder"}
PROBE_PREFIX = ".ccat-write-check-"  # the file check_writable creates and removes


class OutputError(CcatError):
    """An output that would replace an input or a file of a run, or cannot be written."""


def check_output(path: str | Path, option: str, inputs: Iterable[str | Path] = (),
                 may_write: Iterable[str] = ()) -> Path:
    """``path`` when the command may write it there (see the module); else an OutputError
    naming it and the fix (pass ``option`` another path). ``may_write``: the run-folder
    names this command writes itself (``ccat eval``: eval.json)."""
    path = Path(path)
    for source in inputs:
        if same_file(path, Path(source)):
            which = "" if str(path) == str(source) else f" ({source})"
            raise OutputError(f"{path} is an input of this command{which}; pass {option} "
                              f"another path, so that the input is not overwritten")
    for place in dict.fromkeys([path, path.resolve()]):
        _check_place(path, place, option, frozenset(may_write))
    if path.is_dir():
        raise OutputError(f"{path} is a folder; pass {option} a file path")
    if path.exists() and not path.is_file():  # the rename would replace the node itself
        raise OutputError(f"{path} is not a regular file (a device, pipe or socket); pass "
                          f"{option} a file path")
    check_writable(path.parent, option)
    return path


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one file: one path once resolved, or one inode."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def _check_place(shown: Path | str, place: Path, option: str,
                 may_write: frozenset[str]) -> None:
    """Refuse ``place`` (``shown`` as given, or the path it resolves to through its
    symlinks) when a run or a built dataset owns it."""
    if place != shown:
        shown = f"{shown} (which resolves to {place})"
    owner = run_dir.OWNERS.get(place.name)
    if owner and place.name not in may_write:
        raise OutputError(f"{shown} would replace a run folder's {place.name}, which only "
                          f"`{owner}` writes; pass {option} another path")
    if place.name.startswith(".") and run_dir.holds_run(place.parent):
        raise OutputError(f"{shown} is a hidden file of the run folder {place.parent} (its "
                          f"temporary files and lock); pass {option} another path")
    for folder in place.parents:
        if folder.name == run_dir.TB_DIR and run_dir.holds_run(folder.parent):
            raise OutputError(f"{shown} is inside {folder}, the TensorBoard log of a run; "
                              f"pass {option} a path outside it")
    if (place.parent / MANIFEST_NAME).is_file():
        raise OutputError(f"{shown} is in the built dataset {place.parent} (beside its "
                          f"{MANIFEST_NAME}), whose rebuild refuses files it did not write; "
                          f"pass {option} a path outside it")


def check_writable(folder: Path, option: str) -> None:
    """Refuse ``folder`` (to be created if missing) when its nearest existing folder cannot
    take a new file: one is created there and removed."""
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise OutputError(f"cannot write into {folder}: {existing} is not a folder; pass "
                          f"{option} a path in a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        why = WHY.get(err.errno or 0, f"cannot be written ({err.strerror})")
        raise OutputError(f"cannot write into {folder}: {existing} {why}; pass {option} a "
                          f"path in a folder you can write to") from None


@contextlib.contextmanager
def worded(path: Path, option: str) -> Iterator[None]:
    """An OSError while writing ``path`` (a disk that filled during the work) as one
    sentence; the atomic write has left ``path`` as it was."""
    try:
        yield
    except OSError as err:
        raise OutputError(f"cannot write {path} ({err.strerror or err}); it is left as it was: "
                          f"free some space or pass {option} a path on another disk") from None


@contextlib.contextmanager
def output_file(path: Path, option: str) -> Iterator[BinaryIO]:
    """``path`` opened for an atomic binary write (its folders made first)."""
    with worded(path, option):
        path.parent.mkdir(parents=True, exist_ok=True)
        with fileio.atomic_writer(path) as out:
            yield out


def write_text(path: Path, text: str, option: str) -> None:
    """``path`` holds ``text`` (UTF-8), written atomically."""
    with output_file(path, option) as out:
        out.write(text.encode("utf-8"))
