"""The ``--out`` folder of a build: what it may hold, who writes into it, and how
``--overwrite`` keeps the build it replaces until the new one has shards.

A build writes ``manifest.json`` and ``<split>-NNNNNN.tar`` at the top of ``--out`` and its
state (plan, shard records, the lock) in ``.build/``. ``--overwrite`` moves the build that
is there (its files and its ``.build/`` entries) into ``.build/previous/``; the writer drops
it once the new build has a finished shard holding samples in every split it must fill,
and puts it back when the new build stops before that. A build killed in between finds
``previous`` on its next start and puts it back first: its lock kept every other writer
out, so what else the folder holds is that killed build's.

The moves are renames inside one folder, so each is atomic; the two steps that move many
files go through ``previous.moving/``, whose presence means "the files in it belong back
in ``--out``, and ``--out`` holds nothing newer", so a kill at any point is undone by
moving them back.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from ccat import fileio
from ccat.data import spec
from ccat.errors import UserError

STATE_DIR = ".build"
LOCK_NAME = "lock"  # flock-ed by the build writing into the folder, in STATE_DIR
LOCK_ATTEMPTS = 5  # a finishing build may remove the lock file between open and flock
TMP_SUFFIX = ".tmp"  # ccat.fileio's ".<name>.<pid>.tmp", or an older build's "<name>.tmp"
ASIDE = "previous"  # in STATE_DIR: the build an --overwrite replaces, whole
ASIDE_MOVING = "previous.moving"  # its files while they move aside or back
ASIDE_DELETING = "previous.deleting"  # being deleted: the new build has shards
ASIDE_FOLDERS = (ASIDE, ASIDE_MOVING, ASIDE_DELETING)
# A build in parts (preprocess.parts): part I of N holds its own lock and leaves a record.
PART_LOCK = re.compile(r"part-\d+-of-\d+\.lock")
PART_RECORD = re.compile(r"part-(\d+)-of-(\d+)\.json")


class BuildError(UserError, RuntimeError):
    """A build cannot go on; the message names the thing and the fix."""


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


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` atomically (:mod:`ccat.fileio`); a failure is one BuildError sentence."""
    try:
        fileio.write_bytes(path, data)
    except OSError as err:
        raise write_error(err, path) from None


def record_path(out: Path, shard: str) -> Path:
    """Where the record of the shard named ``shard`` is kept until the manifest is written."""
    return out / STATE_DIR / f"{shard}.json"


def is_build_file(name: str) -> bool:
    """Whether ``name``, at the top of ``--out``, is a file a build writes: the manifest,
    a shard, or a temporary file of either."""
    base = name.removesuffix(TMP_SUFFIX)
    if base != name and base.startswith("."):
        base = base[1:].rpartition(".")[0]  # ".<name>.<pid>" -> "<name>"
    return base == spec.MANIFEST_NAME or bool(spec.SHARD_PATTERN.match(base))


def foreign_files(out: Path) -> list[str]:
    """The names at the top of ``out`` that no build writes."""
    return sorted(n for n in os.listdir(out) if n != STATE_DIR and not is_build_file(n))


def state_entries(out: Path) -> list[Path]:
    """The entries of ``out/.build`` that belong to the build there: all but the lock and
    a replaced build's folder."""
    state = out / STATE_DIR
    return sorted(p for p in state.iterdir() if p.name not in (LOCK_NAME, *ASIDE_FOLDERS)
                  and not PART_LOCK.fullmatch(p.name))


def part_records(out: Path) -> list[str]:
    """The names of the part records in ``out/.build`` (a build in parts is there)."""
    state = out / STATE_DIR
    return sorted(n for n in os.listdir(state) if PART_RECORD.fullmatch(n)) if state.is_dir() else []


def _top_files(out: Path) -> list[Path]:
    """The build's files at the top of ``out``, the manifest first."""
    names = sorted((n for n in os.listdir(out) if is_build_file(n)),
                   key=lambda n: (n != spec.MANIFEST_NAME, n))
    return [out / n for n in names]


# ---------------------------------------------------------------- one writer


@contextlib.contextmanager
def locked(out: Path, name: str = LOCK_NAME) -> Iterator[None]:
    """Hold ``out/.build/<name>`` (flock) for the block: a second build into ``out`` fails at
    once; the lock of a killed build dies with its process. The parts of one build each
    hold a lock of their own (``part-I-of-N.lock``), so they can write side by side."""
    make_folder(out)
    lock = out / STATE_DIR / name
    fd = _acquire(lock, out)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if os.listdir(lock.parent) == [name]:  # nothing to resume: leave no trace
                shutil.rmtree(lock.parent)
        os.close(fd)


def _acquire(lock: Path, out: Path) -> int:
    """The open, flock-ed descriptor of ``lock``, holding this process's id."""
    for _ in range(LOCK_ATTEMPTS):
        make_folder(lock.parent)
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


def make_folder(folder: Path) -> None:
    """Create ``folder`` (and its parents); a file in its place is one sentence."""
    if folder.exists() and not folder.is_dir():
        raise BuildError(f"--out {folder} is a file, not a folder; give a folder (new, empty "
                         "or holding a build)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(err, folder) from None


def remove_temporaries(out: Path) -> None:
    """Remove the temporary files a killed build left in ``out`` and ``out/.build`` (under
    the lock no other build is writing them)."""
    for folder in (out, out / STATE_DIR):
        for name in os.listdir(folder):
            if name.endswith(TMP_SUFFIX) and (folder != out or is_build_file(name)):
                with contextlib.suppress(OSError):
                    (folder / name).unlink()


# ---------------------------------------------------------------- the replaced build


def remove_build(out: Path) -> None:
    """Remove the build in ``out``: its files (manifest first) and its ``.build`` entries;
    the lock and a replaced build's folder stay."""
    try:
        for path in _top_files(out):
            path.unlink()
        for path in state_entries(out):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    except OSError as err:
        raise write_error(err, out / STATE_DIR) from None


def move_aside(out: Path) -> bool:
    """Move the build in ``out``, whole, into ``.build/previous``; False when ``out`` holds
    none. The manifest goes first, so no reader ever sees it over missing shards."""
    top, state = _top_files(out), state_entries(out)
    if not top and not state:
        return False
    moving = out / STATE_DIR / ASIDE_MOVING
    try:
        (moving / STATE_DIR).mkdir(parents=True)
        for path in top:
            path.rename(moving / path.name)
        for path in state:
            path.rename(moving / STATE_DIR / path.name)
        moving.rename(out / STATE_DIR / ASIDE)
    except OSError as err:
        restore_aside(out)
        raise write_error(err, moving) from None
    return True


def drop_aside(out: Path) -> None:
    """Delete the replaced build: the new one has shards in every split."""
    state = out / STATE_DIR
    try:
        (state / ASIDE).rename(state / ASIDE_DELETING)
    except OSError as err:
        raise write_error(err, state / ASIDE) from None
    shutil.rmtree(state / ASIDE_DELETING, ignore_errors=True)


def restore_aside(out: Path) -> bool:
    """Put back the build an ``--overwrite`` moved aside, removing what the new build wrote
    (run when the new build stops before it has shards, and at every start, for a build
    killed then); True when a build was put back."""
    state = out / STATE_DIR
    shutil.rmtree(state / ASIDE_DELETING, ignore_errors=True)
    moving = state / ASIDE_MOVING
    try:
        if (state / ASIDE).is_dir():
            remove_build(out)
            (state / ASIDE).rename(moving)
        if not moving.is_dir():
            return False
        saved = moving / STATE_DIR
        for path in sorted(saved.iterdir()) if saved.is_dir() else []:
            path.rename(state / path.name)
        for path in sorted(moving.iterdir(), key=lambda p: p.name == spec.MANIFEST_NAME):
            if path.name != STATE_DIR:
                path.rename(out / path.name)
        shutil.rmtree(moving)
    except OSError as err:
        raise BuildError(f"could not put back the build that --overwrite moved aside into "
                         f"{state / ASIDE} ({err.strerror}); move its files back into {out} "
                         "by hand") from None
    return True
