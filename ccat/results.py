"""``ccat results``: the results page of the docs, generated from evaluated runs.

It writes one Markdown file (``docs/results.md`` in ``make results``) and figures beside
it: a stamp (the git commit, whether tracked files had uncommitted changes, the date and the
exact command that made the runs), the ``ccat report`` table of the runs (mean ± sample std
over seeds) with its rows ranked by fused accuracy, a bar chart of each method's fused test
accuracy and per-modality linear probe with the std over seeds as error bars, and, when the
runs include the baseline (``concat``):
- the fused comparison: each method's fused accuracy against Concat's and the unimodal
  ensemble's (``unimodal``), paired by seed, and which methods are above Concat in every
  seed;
- the sentences of ``ccat summary`` on the same numbers;
- the paper's Figure 1 on these runs: the mean contribution of each modality per epoch for
  Concat, MLA and CCAT on one seed, and whether each narrows the gap between the two.
Nothing in it is typed by hand, so a rerun replaces all of it.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ccat import outputs, run_dir
from ccat.analysis.curves import History, read_history
from ccat.analysis.plots import new_figure, save
from ccat.config import ConfigError, from_dict, read_yaml
from ccat.methods import METHODS
from ccat.provenance import UNRECORDED, git_stamp
from ccat.errors import CcatError
from ccat.report import (PROBE_PREFIX, TRAIN_TIME, Cell, Found, Report, build_report, find_runs,
                         read_json, to_markdown as table_markdown, to_rich as table_rich)
from ccat.story import BASELINE, REFERENCE, method_folders, numbers_of, tell, with_selection
from ccat.ui import make_console

FIGURE_NAME = "results_accuracy.png"
CONTRIBUTIONS_NAME = "results_contributions.png"
FIGURE1_METHODS = ("concat", "mla", "ccat")  # joint training, alternation, CCAT (Figure 1)
SEPARATED_POINTS = 8.0  # "separates from Concat": this many points above it in every seed
LAST_EPOCHS = 3  # the contribution gap is read as the mean over a run's last epochs
GENERATED_NOTE = ("<!-- Written by `ccat results` (`make results`); rerun it rather than "
                  "editing this file. -->")
BAR_GROUP_WIDTH = 0.8  # share of each method's slot on the x axis taken by its bars
LEGEND_ROOM = 118  # top of the y axis (%): the legend sits above bars that reach 100


def bar_columns(report: Report) -> list[tuple[str, str]]:
    """The report's fused and probe columns, in its order."""
    return [(d, n) for d, n in report.columns if n == "fused" or n.startswith(PROBE_PREFIX)]


def accuracy_figure(report: Report, path: Path) -> Path:
    """Grouped bars: per method, fused accuracy and each probe in percent, std as error bars."""
    columns = bar_columns(report)
    datasets = {d for d, _ in columns}
    fig, (ax,) = new_figure(size=(max(7.0, 0.9 * len(report.rows) + 2), 4.0))
    width = BAR_GROUP_WIDTH / len(columns)
    x = np.arange(len(report.rows))
    for k, (dataset, name) in enumerate(columns):
        cells = [report.cells.get((row, (dataset, name))) for row in report.rows]
        means = [100 * c.mean if c else np.nan for c in cells]
        stds = [100 * (c.std or 0.0) if c else 0.0 for c in cells]
        label = name if len(datasets) == 1 else f"{dataset} {name}"
        ax.bar(x + (k - (len(columns) - 1) / 2) * width, means, width,
               yerr=stds if report.seeds > 1 else None, capsize=2, label=label)
    ax.set_xticks(x, report.rows, rotation=30, ha="right")
    ax.set_ylabel(f"{report.split} accuracy (%)")
    ax.set_ylim(0, LEGEND_ROOM)
    over = (f"mean ± std over {report.seeds} seeds" if report.seeds > 1
            else "one seed (no std)")
    ax.set_title(f"fused accuracy and linear probe per modality, {over}")
    ax.legend(fontsize="small", ncols=len(columns), loc="upper center")
    return save(fig, path, f"{', '.join(sorted(datasets))}: {len(report.rows)} methods",
                "--figures")


def _cost_sentence(report: Report) -> str:
    """'33 runs; their training epochs took 1234 s of wall-clock in all (...)'."""
    times = [v for (_, (_, name)), cell in report.cells.items() if name == TRAIN_TIME
             for v in cell.values]
    runs = sum(len(cell.values) for (_, (_, name)), cell in report.cells.items()
               if name == "fused")
    counted = f"{runs} run{'s' * (runs != 1)}"
    if len(times) < runs:
        return f"{counted}; {runs - len(times)} of them did not record their training time."
    return (f"{counted}; their training epochs took {sum(times):.0f} s of wall-clock in all "
            f"(the `{TRAIN_TIME}` column; per-epoch validation and the probes not counted).")


def _story_lines(report: Report, found_folders: dict[str, list[Path]]) -> list[str]:
    """The summary's sentences when the baseline is among the runs, else nothing."""
    rows = numbers_of(report)
    if BASELINE not in {r.method for r in rows}:
        return []
    story = tell(with_selection(rows, found_folders), BASELINE, REFERENCE)
    return ["## What the numbers say", "", *story.sentences, ""]


def ranked(report: Report) -> Report:
    """``report`` with its rows ordered by the mean fused accuracy of its first dataset,
    best first (rows without one last; ties keep the report's order)."""
    fused = next((c for c in report.columns if c[1] == "fused"), None)
    if fused is None:
        return report

    def key(row: str) -> float:
        cell = report.cells.get((row, fused))
        return -cell.mean if cell is not None else 1.0

    return dataclasses.replace(report, rows=sorted(report.rows, key=key))


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def _paired(cell: Cell, base: Cell) -> list[float]:
    """``cell`` minus ``base`` seed by seed, over the seeds both have."""
    theirs = dict(zip(base.seeds, base.values))
    return [v - theirs[s] for s, v in zip(cell.seeds, cell.values) if s in theirs]


def _difference(diffs: list[float]) -> str:
    """'+9.7 ± 2.1' points (mean ± sample std of the paired differences), '+9.7' for one."""
    if not diffs:
        return "—"
    if len(diffs) == 1:
        return _points(diffs[0])
    return f"{_points(statistics.mean(diffs))} ± {100 * statistics.stdev(diffs):.1f}"


def _cost_ratio(cell: Cell | None, base: Cell | None) -> str:
    """'1.52x': ``cell``'s training seconds over ``base``'s, per seed both have, averaged."""
    if cell is None or base is None:
        return "—"
    theirs = dict(zip(base.seeds, base.values))
    ratios = [v / theirs[s] for s, v in zip(cell.seeds, cell.values) if theirs.get(s)]
    return f"{statistics.mean(ratios):.2f}x" if ratios else "—"


def fused_lines(report: Report) -> list[str]:
    """The fused comparison section: per method (ranked), its fused accuracy minus Concat's
    and minus the unimodal ensemble's, paired by seed, and the sentences that read them;
    nothing without a Concat row."""
    fused = next((c for c in report.columns if c[1] == "fused"), None)
    rows = {report.identity[row][0]: row for row in report.rows if not report.identity[row][1]}
    if fused is None or BASELINE not in rows:
        return []
    cell = {method: report.cells[(row, fused)] for method, row in rows.items()
            if (row, fused) in report.cells}
    time_column = (fused[0], TRAIN_TIME)
    seconds = {method: report.cells[(row, time_column)] for method, row in rows.items()
               if (row, time_column) in report.cells}
    base, ensemble = cell[BASELINE], cell.get(REFERENCE)
    lines = ["## Fused accuracy against Concat and the unimodal ensemble", "",
             f"Points of {fused[0]} {report.split} accuracy, each method's fused prediction "
             f"minus {BASELINE}'s{f' and minus {REFERENCE} (the unimodal ensemble)' if ensemble else ''}, "
             f"seed by seed: mean ± sample std of the differences; min: the smallest of them. "
             f"Cost: the method's training wall-clock over {BASELINE}'s, seed by seed (the "
             f"`train s` column; mean of the ratios).",
             "", f"| method | fused | vs {BASELINE} | min vs {BASELINE} |"
             + (f" vs {REFERENCE} |" if ensemble else "") + " cost |",
             "| --- | ---: | ---: | ---: |" + (" ---: |" if ensemble else "") + " ---: |"]
    separated, above_base, above_ensemble = [], [], []
    for method, c in cell.items():
        diffs = _paired(c, base)
        row = [method, f"{100 * c.mean:.2f}", _difference(diffs),
               _points(min(diffs)) if diffs else "—"]
        if ensemble is not None:
            row.append(_difference(_paired(c, ensemble)))
        row.append(_cost_ratio(seconds.get(method), seconds.get(BASELINE)))
        lines.append("| " + " | ".join(row) + " |")
        if method in (BASELINE, REFERENCE) or not diffs:
            continue
        if min(diffs) > 0:
            above_base.append(method)
        if min(diffs) * 100 >= SEPARATED_POINTS:
            separated.append(method)
        if ensemble is not None and c.mean > ensemble.mean:
            above_ensemble.append(method)
    lines += ["", _listed(f"Above {BASELINE} in every seed", above_base) + " "
              + _listed(f"At least {SEPARATED_POINTS:g} points above it in every seed",
                        separated)]
    if ensemble is not None:
        gap = _difference(_paired(ensemble, base))
        lines[-1] += (f" The unimodal ensemble is {gap} points from {BASELINE}; "
                      + _listed("above it on the mean", above_ensemble))
    return [*lines, ""]


def _listed(what: str, methods: list[str]) -> str:
    """'Above concat in every seed: a, b (2 methods).' or '...: none.'"""
    if not methods:
        return f"{what}: none."
    return f"{what}: {', '.join(methods)} ({len(methods)} method{'s' * (len(methods) != 1)})."


def _contribution_gap(history: History) -> float | None:
    """The mean over the run's last LAST_EPOCHS epochs of |contribution of the first
    modality - contribution of the second| on the validation split; None when not logged."""
    if len(history.modalities) != 2:
        return None
    first, second = (history.series(f"{history.val}/contrib/{m}")[1]
                     for m in history.modalities)
    gaps = [abs(a - b) for a, b in zip(first, second)][-LAST_EPOCHS:]
    return statistics.mean(gaps) if gaps else None


def figure1(found: Found, path: Path, link: str) -> list[str]:
    """The paper's Figure 1 on these runs: Concat, MLA and CCAT (those present) on the
    smallest seed they share, one panel each, and the sentences that compare their
    contribution gaps; nothing when fewer than two of them are present."""
    runs: dict[str, dict[int, Path]] = {}
    for result in found.results:
        if result.method in FIGURE1_METHODS and not result.variant:
            runs.setdefault(result.method, {})[result.seed] = result.path.parent
    methods = [m for m in FIGURE1_METHODS if m in runs]
    seeds = set.intersection(*(set(runs[m]) for m in methods)) if methods else set()
    if len(methods) < 2 or not seeds:
        return []
    seed = min(seeds)
    try:
        histories = {m: read_history(runs[m][seed]) for m in methods}
    except CcatError:  # a run without per-epoch validation rows: no curve to draw
        return []
    if not all(h.modalities and all(h.series(f"{h.val}/contrib/{m}")[0] for m in h.modalities)
               for h in histories.values()):
        return []  # a run that logged no contributions: no curve to draw
    fig, axes = new_figure(1, (4.0 * len(methods), 3.6), columns=len(methods))
    for ax, (method, history) in zip(axes, histories.items()):
        for i, m in enumerate(history.modalities):
            ax.plot(*history.series(f"{history.val}/contrib/{m}"), "o-", color=f"C{i}", ms=3,
                    label=m)
        for _, start, _ in history.stage_spans()[1:]:
            ax.axvline(start, color="0.3", linestyle="--", linewidth=1)
        ax.axhline(0.5, color="0.75", linewidth=0.8)
        ax.set_title(method)
        ax.set_ylim(0, 1)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8, loc="best")
    axes[0].set_ylabel(f"mean contribution ({next(iter(histories.values())).val})")
    save(fig, path, f"contribution per epoch, seed {seed}", "--figures")
    gaps = {m: _contribution_gap(h) for m, h in histories.items()}
    told = [f"{m} {100 * g:.1f} points" for m, g in gaps.items() if g is not None]
    lines = ["## The paper's Figure 1 on these runs", "",
             f"![contribution of each modality per epoch]({link})", "",
             f"Mean contribution of each modality on the validation split per epoch (the "
             f"paper's Figure 1; `ccat analyze RUN`), seed {seed}; dashed: a stage boundary. "
             f"The gap between the two modalities' contributions, averaged over each run's "
             f"last {LAST_EPOCHS} epochs: {', '.join(told)}."]
    if gaps.get("concat") is not None and gaps.get("mla") is not None:
        narrows = gaps["mla"] < gaps["concat"]
        lines[-1] += (f" Alternation (mla) {'narrows' if narrows else 'does not narrow'} the "
                      f"gap of joint training (concat).")
        if gaps.get("ccat") is not None:
            than_concat = gaps["ccat"] < gaps["concat"]
            than_mla = gaps["ccat"] < gaps["mla"]
            lines[-1] += (f" CCAT's gap is {'smaller' if than_concat else 'not smaller'} than "
                          f"concat's and {'smaller' if than_mla else 'not smaller'} than "
                          f"mla's; the paper claims both.")
    return [*lines, ""]


def code_sentence(found: Found) -> str:
    """'Trained: 24 runs at commit `a1…` (clean) and 39 before checkpoints recorded their
    code.': the code versions the runs' eval JSONs record (a resumed run may count twice)."""
    counts: Counter[str] = Counter()
    for result in found.results:
        try:
            code = read_json(result.path).get("code", [UNRECORDED])
        except (OSError, ValueError):
            code = [UNRECORDED]
        counts.update(dict.fromkeys(code, 1))
    parts = [f"{n} run{'s' * (n != 1)} at {version}" for version, n in counts.most_common()
             if version != UNRECORDED]
    if counts[UNRECORDED]:
        parts.append(f"{counts[UNRECORDED]} run{'s' * (counts[UNRECORDED] != 1)} before "
                     f"checkpoints recorded their code")
    joined = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"Trained: {joined}."


def changed_params(method: str, folder: Path) -> dict[str, Any] | None:
    """The ``method.params`` of the run in ``folder`` (its config.yaml) that differ from
    ``method``'s Params defaults; every param when the method is not registered here (its
    defaults are unknown); None when the config cannot be read."""
    try:
        params = from_dict(read_yaml(folder / run_dir.CONFIG)).method.params
    except (OSError, ValueError, TypeError, ConfigError):
        return None
    defaults = METHODS.get(method).Params if method in METHODS.names() else None
    base = dataclasses.asdict(defaults()) if defaults is not None else {}
    return {k: v for k, v in params.items() if k not in base or base[k] != v}


def settings_lines(folders: dict[str, list[Path]]) -> list[str]:
    """A section naming, per method, the params its runs trained with that are not its
    Params defaults (its paper's), and the runs whose config.yaml could not be read;
    nothing when every run is known to have trained with the defaults."""
    lines = []
    for method, paths in folders.items():
        found = [changed_params(method, path) for path in paths]
        changed = {k: v for params in found if params for k, v in params.items()}
        unread = sum(params is None for params in found)
        parts = [f"`method.params.{k}={v}`" for k, v in sorted(changed.items())]
        if unread:
            parts.append(f"{unread} run{'s' * (unread != 1)} without a readable config.yaml, "
                         f"settings unknown")
        if parts:
            lines.append(f"- {method}: " + ", ".join(parts))
    if not lines:
        return []
    return ["## Settings that differ from the methods' defaults", "",
            "The defaults are each paper's; these runs changed them (in `make results`, the "
            "Makefile's `DEMO_SCHEDULE_<method>` scales epoch-counted schedules to the demo's "
            "epochs):", "", *lines, ""]


def results_markdown(report: Report, stamp: str, command: str, figure: str,
                     story: list[str], date: str, code: str = "") -> str:
    """The page: stamp, the code that trained the runs, the table ranked by fused accuracy,
    figure, the fused comparison, the sentences."""
    made = [f"Made by `{command}` at {stamp}, on {date} (UTC).", code, _cost_sentence(report)]
    report = ranked(report)
    lines = ["# Results", "", GENERATED_NOTE, "", " ".join(part for part in made if part), "",
             "Rows are ranked by fused accuracy.", "",
             table_markdown(report).rstrip("\n"), "",
             f"![fused accuracy and probes per method]({figure})", "", *fused_lines(report),
             *story]
    return "\n".join(lines).rstrip("\n") + "\n"


def _link(figure: Path, out: Path) -> str:
    """``figure``'s path relative to the folder of the page ``out``."""
    return Path(os.path.relpath(figure, out.parent)).as_posix()


def results(paths: list[Path], out: Path, figures: Path, command: str,
            split: str = "test") -> Path:
    """``ccat results``: write ``out`` and ``figures/results_accuracy.png`` from the runs."""
    if not command.strip():
        raise CcatError("--command is empty; pass the exact command that made the runs, so "
                        "that the page says how to reproduce them")
    found = find_runs(paths, split)
    figure, contributions = figures / FIGURE_NAME, figures / CONTRIBUTIONS_NAME
    outputs.check_output(out, "--out", found.inputs)
    outputs.check_output(figure, "--figures", found.inputs)
    outputs.check_output(contributions, "--figures", found.inputs)
    report = ranked(build_report(found, split))
    stamp = git_stamp(Path.cwd(), (out, figure))
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    text = results_markdown(report, stamp, command,
                            _link(figure, out),
                            _story_lines(report, method_folders(found))
                            + figure1(found, contributions, _link(contributions, out))
                            + settings_lines(method_folders(found)), date,
                            code_sentence(found))
    accuracy_figure(report, figure)
    outputs.write_text(out, text, "--out")
    make_console().print(table_rich(report))
    make_console(stderr=True).print(f"wrote {out} and {figure}", highlight=False)
    return out
