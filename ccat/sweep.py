"""The paper's sequential search for CCAT's LoRA rank r and threshold beta (Table 3,
Figure 4): every rank at the config's beta, then every beta at the best rank, each run
scored by the fused validation accuracy of the epoch its best.pt holds.

Runs go to ``OUT/r<rank>_b<beta>``, each a ``ccat train`` through :mod:`ccat.grid` (the
runs of a phase at once: ``--launcher local --jobs K`` on this machine's GPUs, or one
Slurm job each), so a sweep and a table train the same way. A folder whose run finished
(last.pt at the last epoch of the last stage) with the same config is reused without
starting a process, an unfinished one is resumed, one holding a run with another config
(outside ``config.RESUME_FREE_KEYS``) is refused before anything starts. The score is the
fused validation accuracy of best.pt's epoch in the last stage (the stage best.pt
follows), chosen by the config's ``select``: the best epoch, a tie going to the later one,
or the last epoch; ties between trials go to the earlier grid value.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from rich.table import Table

from ccat import grid as grids
from ccat import run_dir
from ccat.analysis.plots import new_figure, run_title, save
from ccat.config import RunConfig, from_dict, to_dict
from ccat.data.reader import open_dataset
from ccat.errors import CcatError
from ccat.run_config import resolve_params
from ccat.train import check_same_config, finished, is_selected, saved_run
from ccat.ui import make_console

MAX_GRID = 1000  # values one option may expand to; more is a typo in a range's step
GRID_HELP = ("write a comma list like 1,2,4 or an inclusive range start:stop:step like "
             "0.05:0.40:0.05")

console = make_console()


def _number(text: str, option: str) -> Decimal:
    text = text.strip()
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise CcatError(f"{option} has {text!r}, which is not a number; {GRID_HELP}") from None
    if not value.is_finite():
        raise CcatError(f"{option} has {text!r}, which is not a finite number; {GRID_HELP}")
    return value


def _expand(item: str, option: str) -> list[Decimal]:
    """One grid item: a number or an inclusive ``start:stop:step`` range, in exact decimals."""
    parts = item.split(":")
    if len(parts) == 1:
        return [_number(parts[0], option)]
    if len(parts) != 3:
        raise CcatError(f"{option} item {item!r} is neither a number nor start:stop:step; "
                        f"{GRID_HELP}")
    start, stop, step = (_number(p, option) for p in parts)
    if step <= 0 or start > stop:
        raise CcatError(f"{option} range {item!r} needs step > 0 and start <= stop; {GRID_HELP}")
    count = int((stop - start) / step) + 1
    if count > MAX_GRID:
        raise CcatError(f"{option} range {item!r} has {count} values, more than {MAX_GRID}; "
                        f"use a larger step")
    return [start + k * step for k in range(count)]


def parse_grid(text: str, option: str, integer: bool = False) -> list[Any]:
    """``'1,2,4'`` or ``'0.05:0.40:0.05'`` (or both, comma-separated) -> the values in
    order without repeats; with ``integer`` every value must be a whole number."""
    values: list[Decimal] = []
    for item in text.split(","):
        if not item.strip():
            raise CcatError(f"{option} {text!r} has an empty item; {GRID_HELP}")
        values += [v for v in _expand(item, option) if v not in values]
    if len(values) > MAX_GRID:
        raise CcatError(f"{option} {text!r} has {len(values)} values, more than {MAX_GRID}")
    if integer:
        if any(v != v.to_integral_value() for v in values):
            raise CcatError(f"{option} {text!r} must list whole numbers, e.g. 1,2,4,8,16")
        return [int(v) for v in values]
    return [float(v) for v in values]


def check_grids(ranks: list[int], betas: list[float]) -> None:
    """LoRA ranks are positive; contributions, and so beta, lie in [0, 1]."""
    if any(r < 1 for r in ranks):
        raise CcatError(f"--rank {ranks} must be 1 or more; LoRA rank 0 is no LoRA")
    if any(not 0 <= b <= 1 for b in betas):
        raise CcatError(f"--beta {betas} must lie in [0, 1], the range of a contribution")


@dataclass
class Trial:
    """One (rank, beta) run of the sweep and its score."""

    phase: str
    rank: int
    beta: float
    folder: Path
    status: str = ""  # trained, resumed or reused
    val_acc: float = math.nan
    best_epoch: int = 0
    unimodal: dict[str, float] = field(default_factory=dict)


def run_name(rank: int, beta: float) -> str:
    return f"r{rank}_b{beta:g}"


@dataclass(frozen=True)
class Command:
    """What the sweep's ``ccat train`` runs are given: the config file, the built data and
    the ``--set`` overrides, as ``ccat sweep`` got them (each trial adds its rank and beta)."""

    config: Path
    data: str
    overrides: tuple[str, ...] = ()


def _check_trial(trial: Trial, cfg: RunConfig) -> bool:
    """Set ``trial.status``; True when its folder holds the finished run (reused as it is).
    A run there with another config is refused, naming the keys."""
    folder = trial.folder
    resume = run_dir.holds_run(folder)
    done = False
    if resume:
        state, saved = saved_run(folder)
        check_same_config(saved, cfg, folder, fix="remove the folder or sweep into another --out")
        done = state is not None and finished(cfg, state)
    trial.status = "reused" if done else "resumed" if resume else "trained"
    console.print(f"[bold]sweep[/bold] rank {trial.rank}, beta {trial.beta:g}: {folder} "
                  f"({'reused' if done else 'resuming' if resume else 'training'})")
    return done


def _grid_run(trial: Trial, cfg: RunConfig, command: Command) -> grids.GridRun:
    """The trial as a grid run: ``ccat train`` of the config's method and seed with the
    sweep's overrides, then the trial's rank and beta; no ``ccat eval`` (the sweep scores
    validation rows, never test)."""
    args = [a for item in command.overrides for a in ("--set", item)]
    args += ["--set", f"method.params.rank={trial.rank}",
             "--set", f"method.params.beta={trial.beta!r}"]
    return grids.GridRun(cfg.method.name, cfg.seed, trial.folder, command.config,
                         command.data, tuple(args), evaluate=False)


def score(trial: Trial, rows: list[dict[str, Any]], val: str, select: str = "best") -> None:
    """The fused ``val`` accuracy of the epoch best.pt holds, in the last stage: with
    ``select: best`` the best one (:func:`ccat.train.is_selected`: a tie goes to the later
    epoch), with ``select: last`` the last one."""
    last = [r for r in rows if r["stage"] == rows[-1]["stage"]]
    best = last[-1] if select == "last" else last[0]
    if select != "last":
        for row in last[1:]:
            if is_selected(row[f"{val}/acc/fused"], best[f"{val}/acc/fused"]):
                best = row
    trial.val_acc, trial.best_epoch = best[f"{val}/acc/fused"], best["epoch"]
    prefix = f"{val}/acc/"
    trial.unimodal = {k[len(prefix):]: v for k, v in best.items()
                      if k.startswith(prefix) and k != f"{prefix}fused"}


def _trial_config(base: RunConfig, rank: int, beta: float, folder: Path) -> RunConfig:
    cfg = from_dict(to_dict(base))
    cfg.method.params.update(rank=rank, beta=beta)
    cfg.out = str(folder)
    return cfg


def _searchable(cfg: RunConfig) -> RunConfig:
    """``cfg`` with every method param filled in; its method must have a rank and a beta."""
    cfg = from_dict(to_dict(cfg))
    resolve_params(cfg)
    if not {"rank", "beta"} <= cfg.method.params.keys():
        raise CcatError(f"ccat sweep searches method.params.rank and method.params.beta, "
                        f"which method {cfg.method.name!r} does not have; use method ccat")
    return cfg


def _run_phase(phase: str, points: list[tuple[int, float]], base: RunConfig, out: Path,
               command: Command, launch: grids.GridOptions) -> list[Trial]:
    """Train the phase's trials on ``launch`` (all at once, as it allows), then score each."""
    trials = [Trial(phase, rank, beta, out / run_name(rank, beta)) for rank, beta in points]
    runs = [_grid_run(trial, base, command) for trial in trials
            if not _check_trial(trial, _trial_config(base, trial.rank, trial.beta, trial.folder))]
    if runs:
        grids.grid(runs, launch, out, lambda run: console.print(f"done: {run.folder}"))
    for trial in trials:
        score(trial, run_dir.read_metrics(trial.folder), base.data.val_split, base.select)
    return trials


def _best(trials: list[Trial]) -> Trial:
    return max(trials, key=lambda t: t.val_acc)  # max keeps the first of equals


def sweep(base: RunConfig, ranks: list[int], betas: list[float], out: str | Path,
          command: Command, launch: grids.GridOptions = grids.GridOptions()) -> dict[str, Any]:
    """Rank first (beta at the config's value), then beta at the best rank; writes
    OUT/sweep.md, sweep.csv, sweep.json, rank.png and beta.png; returns the choice.
    ``base`` is ``command`` loaded (:func:`ccat.run_config.load_config`)."""
    check_grids(ranks, betas)
    base = _searchable(base)
    _check_validation(base)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rank_trials = _run_phase("rank", [(r, base.method.params["beta"]) for r in ranks], base,
                             out, command, launch)
    best_rank = _best(rank_trials).rank
    beta_trials = _run_phase("beta", [(best_rank, b) for b in betas], base, out, command,
                             launch)
    chosen = _best(beta_trials)
    trials = rank_trials + beta_trials
    result = {"rank": chosen.rank, "beta": chosen.beta, "val_acc": chosen.val_acc,
              "run": str(chosen.folder), "val_split": base.data.val_split,
              "files": write_results(trials, chosen, base.data.val_split, out)}
    console.print(results_table(trials, chosen, base.data.val_split))
    console.print(f"chosen: rank {chosen.rank}, beta {chosen.beta:g} "
                  f"({base.data.val_split} accuracy {chosen.val_acc:.4f}) in {chosen.folder}")
    return result


def _check_validation(cfg: RunConfig) -> None:
    """Hyperparameters are chosen on validation, never on test."""
    splits = open_dataset(cfg.data.path, cfg.data.cache_dir or None).splits
    if cfg.data.val_split not in splits:
        raise CcatError(f"{cfg.data.path} has no validation split {cfg.data.val_split!r} "
                        f"(it has {splits}); build the shards with one, since choosing r and "
                        f"beta on test would report a tuned test score")


COLUMNS = ["phase", "rank", "beta", "val_acc", "best_epoch", "status", "chosen", "run"]


def _table_rows(trials: list[Trial], chosen: Trial) -> tuple[list[str], list[list[str]]]:
    modalities = list(trials[0].unimodal)
    header = COLUMNS[:4] + [f"val_acc_{m}" for m in modalities] + COLUMNS[4:]
    rows = []
    for t in trials:
        cells = [t.phase, str(t.rank), f"{t.beta:g}", f"{t.val_acc:.4f}"]
        cells += [f"{t.unimodal[m]:.4f}" for m in modalities]
        cells += [str(t.best_epoch), t.status, "yes" if t is chosen else "", t.folder.name]
        rows.append(cells)
    return header, rows


def write_results(trials: list[Trial], chosen: Trial, val: str, out: Path) -> dict[str, str]:
    """The table as Markdown and CSV, the choice as JSON, the two accuracy plots."""
    header, rows = _table_rows(trials, chosen)
    with open(out / "sweep.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    lines = [f"# Sweep: rank, then beta at rank {chosen.rank} ({val} accuracy, fused)", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", f"Chosen: rank {chosen.rank}, beta {chosen.beta:g} "
                  f"({val} accuracy {chosen.val_acc:.4f}, run `{chosen.folder.name}`)."]
    (out / "sweep.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "sweep.json").write_text(json.dumps(
        {"rank": chosen.rank, "beta": chosen.beta, "val_acc": chosen.val_acc,
         "run": chosen.folder.name, "val_split": val,
         "trials": [dict(zip(header, r)) for r in rows]}, indent=2) + "\n", encoding="utf-8")
    rank_png = _plot([t for t in trials if t.phase == "rank"], "rank", val, out / "rank.png")
    beta_png = _plot([t for t in trials if t.phase == "beta"], "beta", val, out / "beta.png")
    return {"markdown": str(out / "sweep.md"), "csv": str(out / "sweep.csv"),
            "json": str(out / "sweep.json"), "rank_plot": str(rank_png),
            "beta_plot": str(beta_png)}


def _plot(trials: list[Trial], phase: str, val: str, path: Path) -> Path:
    """Validation accuracy against rank (evenly spaced) or beta, the best marked."""
    fig, (ax,) = new_figure(size=(6.0, 3.6))
    xs = list(range(len(trials))) if phase == "rank" else [t.beta for t in trials]
    ys = [t.val_acc for t in trials]
    ax.plot(xs, ys, "o-", color="C0")
    top = max(range(len(trials)), key=lambda i: ys[i])
    ax.plot([xs[top]], [ys[top]], "*", color="C3", ms=14, label="best")
    if phase == "rank":
        ax.set_xticks(xs, [str(t.rank) for t in trials])
        ax.set_title(f"beta {trials[0].beta:g}", fontsize=9)
    else:
        ax.set_title(f"rank {trials[0].rank}", fontsize=9)
    ax.set_xlabel("LoRA rank r" if phase == "rank" else "beta")
    ax.set_ylabel(f"best {val} accuracy (fused)")
    ax.legend(fontsize=8)
    return save(fig, path, run_title(path.parent, "ccat sweep"))


def results_table(trials: list[Trial], chosen: Trial, val: str) -> Table:
    header, rows = _table_rows(trials, chosen)
    table = Table(title=f"sweep ({val} accuracy)")
    for name in header:
        table.add_column(name, justify="left" if name in ("phase", "status", "run") else "right")
    for row in rows:
        table.add_row(*row)
    return table
