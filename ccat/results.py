"""``ccat results``: the results page of the docs, generated from evaluated runs.

It writes one Markdown file (``docs/results.md`` in ``make results``) and one figure beside
it: a stamp (the git commit, whether tracked files had uncommitted changes, the date and the
exact command that made the runs), the ``ccat report`` table of the runs (mean ± sample std
over seeds), a bar chart of each method's fused test accuracy and per-modality linear probe
with the std over seeds as error bars, and, when the runs include the baseline
(``concat``), the two sentences of ``ccat summary`` on the same numbers. Nothing in it is
typed by hand, so a rerun replaces all of it.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ccat import outputs, run_dir
from ccat.analysis.plots import new_figure, save
from ccat.config import ConfigError, from_dict, read_yaml
from ccat.methods import METHODS
from ccat.provenance import UNRECORDED, git_stamp
from ccat.errors import CcatError
from ccat.report import (PROBE_PREFIX, TRAIN_TIME, Found, Report, build_report, find_runs,
                         read_json, to_markdown as table_markdown, to_rich as table_rich)
from ccat.story import BASELINE, REFERENCE, method_folders, numbers_of, tell, with_selection
from ccat.ui import make_console

FIGURE_NAME = "results_accuracy.png"
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
    """The summary's two sentences when the baseline is among the runs, else nothing."""
    rows = numbers_of(report)
    if BASELINE not in {r.method for r in rows}:
        return []
    story = tell(with_selection(rows, found_folders), BASELINE, REFERENCE)
    return ["## What the numbers say", "", *story.sentences, ""]


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
    """The page: stamp, the code that trained the runs, table, figure, the sentences."""
    made = [f"Made by `{command}` at {stamp}, on {date} (UTC).", code, _cost_sentence(report)]
    lines = ["# Results", "", GENERATED_NOTE, "", " ".join(part for part in made if part), "",
             table_markdown(report).rstrip("\n"), "",
             f"![fused accuracy and probes per method]({figure})", "", *story]
    return "\n".join(lines).rstrip("\n") + "\n"


def results(paths: list[Path], out: Path, figures: Path, command: str,
            split: str = "test") -> Path:
    """``ccat results``: write ``out`` and ``figures/results_accuracy.png`` from the runs."""
    if not command.strip():
        raise CcatError("--command is empty; pass the exact command that made the runs, so "
                        "that the page says how to reproduce them")
    found = find_runs(paths, split)
    figure = figures / FIGURE_NAME
    outputs.check_output(out, "--out", found.inputs)
    outputs.check_output(figure, "--figures", found.inputs)
    report = build_report(found, split)
    stamp = git_stamp(Path.cwd(), (out, figure))
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    text = results_markdown(report, stamp, command,
                            Path(os.path.relpath(figure, out.parent)).as_posix(),
                            _story_lines(report, method_folders(found))
                            + settings_lines(method_folders(found)), date,
                            code_sentence(found))
    accuracy_figure(report, figure)
    outputs.write_text(out, text, "--out")
    make_console().print(table_rich(report))
    make_console(stderr=True).print(f"wrote {out} and {figure}", highlight=False)
    return out
