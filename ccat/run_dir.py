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

Tests only: with ``CCAT_KILL_AFTER=NAME:N`` in the environment (``NAME`` one of
``metrics.jsonl``, ``last.pt``, ``best.pt``), the process SIGKILLs itself right after its
N-th write of that file, to exercise the kill points above on the real code path.
"""

from __future__ import annotations

import collections
import filecmp
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

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
    """Remove the run files of ``folder`` (``--overwrite``); other files stay."""
    for name in (*RUN_FILES, EVAL, *(f".{run_file}.tmp" for run_file in RUN_FILES)):
        (folder / name).unlink(missing_ok=True)
    for name in (TB_DIR, *DERIVED_DIRS):
        shutil.rmtree(folder / name, ignore_errors=True)


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
    tmp = folder / f".{METRICS}.tmp"
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
    os.replace(tmp, folder / METRICS)
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
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)


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
    file, _, count = target.rpartition(":")
    if file == name and str(_writes[name]) == count:
        os.kill(os.getpid(), signal.SIGKILL)
