"""A run folder: the one place that names its files, reads, appends and cuts its metrics,
and says who the run is (:func:`run_block`).

A run folder holds one run. ``ccat train`` writes, per epoch and in this order:

1. one row appended to ``metrics.jsonl`` (flushed and fsynced),
2. ``last.pt`` (atomically): the commit point of the epoch,
3. ``best.pt`` (atomically) when the epoch is the selected one so far; it is then a copy
   of ``last.pt``.

``--resume`` continues from ``last.pt``: rows after its epoch are cut from
``metrics.jsonl``, and when ``last.pt`` records that its own epoch was the selected one,
``best.pt`` is copied from it again. A kill after any of the three writes therefore
resumes to the uninterrupted run: rows written ahead of ``last.pt`` are cut and trained
again, and a ``best.pt`` missed by the kill is restored from ``last.pt``.

One writer at a time (:func:`locked`): ``ccat train`` holds ``.lock`` in the folder (an
``flock``, see :mod:`ccat.folder_lock`) from before it reads the folder until it ends, so a
second ``ccat train`` of the folder is refused naming the first one's process and host.

``--overwrite`` (:func:`replacing`) never deletes a run before its replacement has a
checkpoint: once every check has passed, the old run's files are moved into
``.overwritten/`` (through ``.overwritten.moving/``, so the move is whole or undone), and
that folder is deleted when the new run's first ``last.pt`` is written. An error before
that puts the old files back at once. A kill before that leaves ``.overwritten/``; the next
``ccat train`` of the folder (any kind) puts it back when the folder has no ``last.pt``,
and deletes it when the folder has one (the new run's: the kill came after its first
checkpoint). ``.overwritten.moving/`` always holds files whose place is the folder: they are
moved back.

Tests only: with ``CCAT_KILL_AFTER=NAME:N`` in the environment (``NAME`` one of
``metrics.jsonl``, ``last.pt``, ``best.pt``), the process SIGKILLs itself right after its
N-th write of that file, to exercise the kill points above on the real code path;
``NAME:N:INT`` sends SIGINT (Ctrl-C) instead.
"""

from __future__ import annotations

import collections
import contextlib
import filecmp
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Iterator

from ccat import fileio, folder_lock
from ccat.config import MethodConfig, RunConfig
from ccat.errors import CcatError

METRICS = "metrics.jsonl"
LAST = "last.pt"
BEST = "best.pt"
CONFIG = "config.yaml"
EVAL = "eval.json"  # what `make table` and the README's `ccat eval --json` write
TB_DIR = "tb"  # OUT/tb/: TensorBoard event files
PLOTS_DIR = "plots"  # OUT/plots/: `ccat analyze`'s curves of the run
ANALYSIS_DIR = "analysis"  # OUT/analysis/: `ccat analyze`'s feature geometry of a checkpoint
DERIVED_DIRS = (PLOTS_DIR, ANALYSIS_DIR)  # what `ccat analyze` writes into a run folder
RUN_FILES = (METRICS, LAST, BEST, CONFIG)  # any of these: the folder holds a run
# Every name a run folder owns, with the command that writes it: no other output takes one
# of these names anywhere (ccat.outputs refuses it), nor a hidden name (".x": temporary
# files, the lock) in a run folder.
OWNERS = {METRICS: "ccat train", LAST: "ccat train", BEST: "ccat train",
          CONFIG: "ccat train", TB_DIR: "ccat train", EVAL: "ccat eval"}
REPLACED = (*RUN_FILES, EVAL, TB_DIR, *DERIVED_DIRS)  # what --overwrite replaces
LOCK = ".lock"  # flock-ed by the `ccat train` writing the folder, which names itself in it
OVERWRITTEN = ".overwritten"  # --overwrite: the replaced run, until the new one's first last.pt
MOVING = ".overwritten.moving"  # run files on their way in or out of OVERWRITTEN: the folder's
KILL_ENV = "CCAT_KILL_AFTER"
# Table 2's switches, and fresh_encoders=false (the other reading of Algorithm 1 line 4).
ABLATION_SWITCHES = ("fixed_classifier", "alternating", "secondary", "lora", "fresh_encoders")
SWITCH_LABELS = {name: f"no {name.replace('_', ' ')}" for name in ABLATION_SWITCHES}

_writes: collections.Counter[str] = collections.Counter()


def variant_label(method: MethodConfig) -> str:
    """'' for the full method, else the Table 2 switches its params turn off: 'no secondary'."""
    return ", ".join(label for name, label in SWITCH_LABELS.items()
                     if method.params.get(name) is False)


def run_block(cfg: RunConfig, dataset: str) -> dict[str, Any]:
    """What identifies a run in a comparison; ``ccat eval`` stores it in its JSON."""
    return {"method": cfg.method.name, "variant": variant_label(cfg.method),
            "dataset": dataset, "seed": cfg.seed}


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds (part of) a run that ``ccat train`` wrote."""
    return any((folder / name).exists() for name in RUN_FILES)


def clear(folder: Path) -> None:
    """Remove the run files of ``folder`` and its temporary files; other files stay."""
    for name in (*RUN_FILES, EVAL):
        (folder / name).unlink(missing_ok=True)
    for tmp in temporaries(folder):
        tmp.unlink(missing_ok=True)
    for name in (TB_DIR, *DERIVED_DIRS):
        shutil.rmtree(folder / name, ignore_errors=True)


def temporaries(folder: Path) -> list[Path]:
    """The run files' unfinished atomic writes (``.last.pt.<pid>.tmp``) in ``folder``."""
    return [tmp for name in (*RUN_FILES, EVAL) for tmp in folder.glob(f".{name}.*tmp")]


@contextlib.contextmanager
def locked(folder: Path, writer: bool = True) -> Iterator[list[str]]:
    """Hold ``folder``'s lock for the block (``writer``: rank 0; other ranks take none),
    after putting right what a killed ``--overwrite`` left; yields notes to print. Refuses,
    before any work, a folder that is a file, that cannot be written, or that another
    process holds."""
    if not writer:
        yield []
        return
    if folder.exists() and not folder.is_dir():
        raise CcatError(f"--out {folder} is a file, not a folder; choose a folder for the run")
    made = [path for path in (folder, *folder.parents) if not path.exists()]  # leaf first
    try:
        fd = folder_lock.acquire(folder / LOCK)
    except folder_lock.Busy as busy:
        raise CcatError(f"{folder} is being written by another ccat train ({busy.holder}); "
                        f"wait for it to end, or train into another --out") from None
    except OSError as err:
        raise CcatError(f"cannot write into {folder} ({err.strerror}); give --out a folder "
                        f"you can write to") from None
    notes = [] if fd is not None else [f"{folder}'s file system cannot lock files, so a "
                                       f"second ccat train of it would not be refused"]
    try:
        yield [*notes, *filter(None, [recover(folder)])]
    finally:
        folder_lock.release(folder / LOCK, fd)
        with contextlib.suppress(OSError):  # a run refused before it wrote leaves no folder
            for path in made:
                path.rmdir()


def recover(folder: Path) -> str:
    """Put right what a kill during ``--overwrite`` left (see the module's doc); says what
    it did ('' when nothing was left)."""
    if (folder / MOVING).is_dir():
        _move_back(folder)
        return f"put back the run files of {folder} that a killed --overwrite was moving"
    if not (folder / OVERWRITTEN).is_dir():
        return ""
    if (folder / LAST).exists():
        shutil.rmtree(folder / OVERWRITTEN)
        return (f"removed {folder / OVERWRITTEN}, the run that a killed --overwrite had "
                f"replaced: its replacement has a checkpoint")
    restore(folder)
    return (f"put back the run of {folder} from {OVERWRITTEN}/: the --overwrite that replaced "
            f"it was killed before its first checkpoint")


def set_aside(folder: Path) -> None:
    """Move the run's files into ``folder/.overwritten`` (through ``.overwritten.moving``, so
    that a kill leaves the move whole or undone); unfinished temporary files are deleted."""
    moving = folder / MOVING
    moving.mkdir()
    for name in REPLACED:
        if (folder / name).exists() or (folder / name).is_symlink():
            os.replace(folder / name, moving / name)
    for tmp in temporaries(folder):
        tmp.unlink(missing_ok=True)
    os.replace(moving, folder / OVERWRITTEN)
    fileio.fsync_folder(folder)


def restore(folder: Path) -> None:
    """Undo :func:`set_aside`: the new run's files go, the replaced run's come back."""
    clear(folder)
    os.replace(folder / OVERWRITTEN, folder / MOVING)
    _move_back(folder)


def _move_back(folder: Path) -> None:
    """Every entry of ``folder/.overwritten.moving`` back into ``folder``."""
    moving = folder / MOVING
    for entry in moving.iterdir():
        target = folder / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    moving.rmdir()
    fileio.fsync_folder(folder)


def discard_replaced(folder: Path) -> None:
    """The new run has a checkpoint: delete the run it replaces (if any)."""
    if (folder / OVERWRITTEN).is_dir():
        shutil.rmtree(folder / OVERWRITTEN)


@contextlib.contextmanager
def replacing(folder: Path, active: bool) -> Iterator[None]:
    """``--overwrite`` (when ``active``): the old run is set aside for the block, deleted by
    :func:`discard_replaced` once the new run has a checkpoint (or when the block ends), and
    put back when the block raises before that."""
    if not active:
        yield
        return
    try:
        set_aside(folder)
    except OSError as err:
        if (folder / MOVING).is_dir():
            _move_back(folder)
        raise CcatError(f"cannot set the run in {folder} aside ({err.strerror}); make the "
                        f"folder writable, then run the command again") from None
    try:
        yield
    except BaseException:
        if (folder / OVERWRITTEN).is_dir():
            restore(folder)
        raise
    discard_replaced(folder)


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """Every complete row of ``folder/metrics.jsonl`` ([] when there is none)."""
    path = folder / METRICS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except (ValueError, RecursionError):  # a row cut by a kill mid-write (the rest was
            break  # never written), or one nested too deeply to parse: the rows before it
    return rows


def training_cost(folder: Path) -> dict[str, float]:
    """The run's training wall-clock (seconds, summed over its epochs' ``train_s``) and
    samples/s over it; {} when a row lacks ``train_s`` (written before it was recorded).

    Every epoch's row counts once: a resumed run keeps the rows up to ``last.pt`` from the
    interrupted process and appends its own, so the sum is the time of the epochs the run
    consists of, across processes. Work lost to an interruption (an epoch begun but not
    saved, then trained again) and the per-epoch evaluations are not counted."""
    rows = read_metrics(folder)
    if not rows or any("train_s" not in row or "samples_per_s" not in row for row in rows):
        return {}
    seconds = sum(row["train_s"] for row in rows)
    samples = sum(row["train_s"] * row["samples_per_s"] for row in rows)
    return {"train_s": seconds, "samples_per_s": samples / seconds if seconds else 0.0}


SELECTED_PREFIX = "selected/"  # CCAT's stage-2 rows: the fraction picked for secondary updates


def selected_fractions(folder: Path) -> dict[str, float]:
    """Per modality, the mean over the run's epochs that record it (CCAT's stage 2, with
    secondary updates on) of ``selected/<m>``: the fraction of training samples picked for a
    secondary update; {} for a run that records none (every other method)."""
    rows = [row for row in read_metrics(folder) if any(k.startswith(SELECTED_PREFIX) for k in row)]
    names = dict.fromkeys(k for row in rows for k in row if k.startswith(SELECTED_PREFIX))
    return {k[len(SELECTED_PREFIX):]: sum(row.get(k, 0.0) for row in rows) / len(rows)
            for k in names}


def cut_metrics(folder: Path, rows: int) -> list[dict[str, Any]]:
    """Keep the first ``rows`` rows of ``metrics.jsonl`` (rewritten atomically); returns them."""
    kept = read_metrics(folder)
    if len(kept) < rows:
        raise CcatError(f"{folder / METRICS} has {len(kept)} complete rows but {folder / LAST} "
                        f"is at epoch {rows} of the run; the folder was changed by hand: "
                        f"train it again with --overwrite")
    kept = kept[:rows]
    fileio.write_text(folder / METRICS, "".join(json.dumps(row) + "\n" for row in kept))
    return kept


def append_metrics(folder: Path, row: dict[str, Any]) -> None:
    """Append one epoch's row, flushed to disk before the epoch's checkpoint is written."""
    with open(folder / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    written(METRICS)


def copy_atomic(source: Path, target: Path) -> None:
    """``target`` becomes a copy of ``source``; readers never see half of it."""
    with open(source, "rb") as f, fileio.atomic_writer(target) as out:
        shutil.copyfileobj(f, out)


def copy_if_differs(source: Path, target: Path) -> bool:
    """:func:`copy_atomic` unless ``target`` already holds ``source``'s bytes (so a finished
    run's ``best.pt`` keeps its time stamp, and ``make table`` does not re-evaluate it);
    True when it copied."""
    if target.is_file() and filecmp.cmp(source, target, shallow=False):
        return False
    copy_atomic(source, target)
    return True


def written(name: str) -> None:
    """Count a write of run file ``name``; the ``CCAT_KILL_AFTER`` test hook acts here."""
    target = os.environ.get(KILL_ENV)
    if not target:
        return
    _writes[name] += 1
    file, count, *sent = target.split(":")
    if file == name and str(_writes[name]) == count:
        os.kill(os.getpid(), signal.Signals[f"SIG{sent[0] if sent else 'KILL'}"])
