"""``ccat report``: the eval JSON of many runs -> one Table-1-style comparison.

Rows are methods (an ablation variant of a method is a row of its own, e.g. "ccat (no
secondary)"); columns are, per dataset, the fused accuracy, each modality's accuracy
(Sec. 4.1, read differently by each method), each modality's linear probe (``ccat eval
--probe``; the same measure for every method), the training wall-clock and samples/s
(the run folder's metrics.jsonl); cells are the mean ± sample standard deviation over
seeds. A run without a probe or timing shows an empty cell there. A run is identified by the
``run`` block that ``ccat eval`` writes into its JSON (method, variant, dataset, seed), or,
for older JSON, by the ``config.yaml`` next to it and the manifest of its data.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from ccat import outputs, run_dir
from ccat.config import ConfigError, RunConfig, from_dict, read_yaml
from ccat.data.spec import MANIFEST_NAME
from ccat.errors import CcatError
from ccat.run_dir import SWITCH_LABELS, run_block
from ccat.ui import make_console

EVAL_NAME = run_dir.EVAL
CONFIG_NAME = run_dir.CONFIG
FORMATS = ("table", "markdown", "csv")
TABLE_MD, TABLE_CSV = "table.md", "table.csv"  # what --out DIR receives
CAPTION_MARKS = "**bold**: best in its column; <u>underlined</u>: second best"
CSV_FIELDS = ["row", "method", "variant", "dataset", "accuracy", "mean", "std", "n", "seeds",
              "rank"]
PROBE_PREFIX = "probe "  # column "probe audio": the linear probe of the audio encoder
TRAIN_TIME, THROUGHPUT = "train s", "samples/s"  # columns from the run's metrics.jsonl
COST_COLUMNS = (TRAIN_TIME, THROUGHPUT)  # not accuracies: shown as numbers, never ranked


@dataclass(frozen=True)
class RunResult:
    """One evaluated run: who it is, its values by column (accuracies and probes as
    fractions, the training cost) and how its checkpoint was selected."""

    path: Path
    method: str
    variant: str
    dataset: str
    seed: int
    values: dict[str, float]  # column -> value: "fused", "audio", "probe audio", "train s"
    selection: str = "unrecorded"
    protocol: str = "shared"  # whose training settings: its config.yaml's protocol

    @property
    def row(self) -> str:
        return f"{self.method} ({self.variant})" if self.variant else self.method


@dataclass
class Found:
    """What a search of the RUN_DIRs turned up."""

    results: list[RunResult] = field(default_factory=list)
    unevaluated: list[Path] = field(default_factory=list)  # run folders without eval.json
    skipped: list[str] = field(default_factory=list)  # eval JSON not used, with the reason
    inputs: list[Path] = field(default_factory=list)  # every eval JSON found, used or not


def _dataset_of(cfg: RunConfig, run_dir: Path) -> str:
    """The dataset name from the manifest of the run's data, else the data folder's name."""
    manifest = Path(cfg.data.path) / MANIFEST_NAME
    if not manifest.is_absolute():
        manifest = Path.cwd() / manifest
    try:
        return read_json(manifest)["dataset"]
    except (OSError, ValueError, KeyError, TypeError):
        return Path(cfg.data.path.rstrip("/")).name or run_dir.name


def _identity(metrics: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The JSON's ``run`` block, or one rebuilt from the run folder's config.yaml."""
    if isinstance(metrics.get("run"), dict):
        return metrics["run"]
    config = run_dir / CONFIG_NAME
    if not config.is_file():
        raise FileNotFoundError(f"no 'run' block in it and no {config}")
    cfg = from_dict(read_yaml(config))
    return run_block(cfg, _dataset_of(cfg, run_dir))


def protocol_of(folder: Path) -> str:
    """The ``protocol`` of the run in ``folder`` (its config.yaml): ``shared`` also for a run
    saved before the key existed; ``unrecorded`` without a readable config.yaml."""
    try:
        return str(read_yaml(folder / CONFIG_NAME).get("protocol", "shared"))
    except (OSError, ConfigError, AttributeError):
        return "unrecorded"


# What each protocol means, as the caption says it.
PROTOCOLS = {"shared": "the config's optimizer, schedule, batch and epochs for every method",
             "released": "each method with the optimizer, schedule, batch and epochs of its "
                         "authors' code for the dataset (ccat/configs/methods/<method>.yaml, "
                         "released)",
             "unrecorded": "no readable config.yaml"}


def selection_text(selection: Any) -> str:
    """How best.pt was chosen, from the eval JSON's ``selection``: 'best fused accuracy
    on 'val', ties to the later epoch' or 'last epoch'."""
    if not isinstance(selection, dict) or "rule" not in selection:
        return "unrecorded"
    if selection.get("split") is None:
        return str(selection["rule"])
    ties = f", ties to the {selection['ties']}" if selection.get("ties") else ""
    return f"{selection['rule']} on {selection['split']!r}{ties}"


def read_json(path: Path) -> Any:
    """The JSON in ``path``; ValueError says why it cannot be read, including JSON nested
    deeper than Python's parser goes (which raises RecursionError)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ValueError("its JSON is nested too deeply to read") from None


def _finite(where: str, value: Any) -> float:
    """``value`` as a float; ValueError for NaN or an infinity (which JSON from Python may
    hold), since neither is an accuracy."""
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{where} is {number}, not a finite number")
    return number


def _values(metrics: dict[str, Any], folder: Path) -> dict[str, float]:
    """The columns of one run: accuracies, probes, then the training cost of its folder
    (left out when not finite: an edited metrics.jsonl)."""
    values = {str(k): _finite(f"accuracy.{k}", v) for k, v in metrics["accuracy"].items()}
    values.update({f"{PROBE_PREFIX}{k}": _finite(f"probe.{k}", v)
                   for k, v in metrics.get("probe", {}).items()})
    cost = run_dir.training_cost(folder)
    if cost and all(math.isfinite(v) for v in cost.values()):
        values.update({TRAIN_TIME: cost["train_s"], THROUGHPUT: cost["samples_per_s"]})
    return values


def read_result(path: Path, split: str) -> RunResult:
    """One eval JSON as a :class:`RunResult`; ValueError says why it cannot be used."""
    try:
        metrics = read_json(path)
        run = _identity(metrics, path.parent)
        result = RunResult(path, str(run["method"]), str(run.get("variant", "")),
                           str(run["dataset"]), int(run["seed"]),
                           _values(metrics, path.parent),
                           selection_text(metrics.get("selection")), protocol_of(path.parent))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ConfigError,
            RecursionError) as err:
        raise ValueError(f"unusable ({type(err).__name__}: {err})") from None
    if metrics.get("split") != split:
        raise ValueError(f"it evaluates split {metrics.get('split')!r}, not {split!r}")
    return result


def _visible(root: Path, paths: Any) -> list[Path]:
    """``paths`` under ``root`` outside hidden folders, sorted: a run that ``--overwrite``
    set aside (``.overwritten/``) until the new run's first checkpoint is no result."""
    return sorted(p for p in paths
                  if not any(part.startswith(".") for part in p.relative_to(root).parts[:-1]))


def find_runs(paths: list[Path], split: str = "test") -> Found:
    """Every eval.json under ``paths`` (run folders or folders of runs, searched
    recursively), and the run folders (holding config.yaml) that have none."""
    found, seen = Found(), set()
    for root in paths:
        if not root.is_dir():
            raise CcatError(f"{root} is not a folder; pass run folders or folders of runs")
        evals = _visible(root, root.rglob(EVAL_NAME))
        runs = sorted(c.parent for c in _visible(root, root.rglob(CONFIG_NAME)))
        if not evals and not runs:
            raise CcatError(f"no runs under {root}: no {EVAL_NAME} or {CONFIG_NAME} in it or "
                            f"below it")
        for path in evals:
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            found.inputs.append(path)
            try:
                found.results.append(read_result(path, split))
            except ValueError as err:
                found.skipped.append(f"{path}: {err}")
        found.unevaluated += [r for r in runs if not (r / EVAL_NAME).is_file()
                              and r not in found.unevaluated]
    return found


@dataclass
class Cell:
    """One method on one dataset, one accuracy: mean and sample std over seeds."""

    values: list[float]
    seeds: list[int]
    rank: int = 0  # 1 = best in its column, 2 = second best, 0 = neither

    @property
    def mean(self) -> float:
        return statistics.mean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None


@dataclass
class Report:
    """The comparison: rows, (dataset, accuracy) columns, cells, notes."""

    split: str
    rows: list[str]
    columns: list[tuple[str, str]]
    cells: dict[tuple[str, tuple[str, str]], Cell]
    identity: dict[str, tuple[str, str]]  # row -> (method, variant)
    notes: list[str]
    selections: dict[str, list[str]] = field(default_factory=dict)  # how best.pt -> rows
    protocols: dict[str, list[str]] = field(default_factory=dict)  # protocol -> rows

    @property
    def seeds(self) -> int:
        return max(len(c.values) for c in self.cells.values())


def _row_order(results: list[RunResult]) -> list[str]:
    """Methods in order of first appearance; each full method before its ablations, which
    follow the order of run_dir.ABLATION_SWITCHES (Table 2)."""
    methods = list(dict.fromkeys(r.method for r in results))
    labels = {r.row: r for r in results}
    known = list(SWITCH_LABELS.values())

    def key(label: str) -> tuple:
        r = labels[label]
        parts = r.variant.split(", ") if r.variant else []
        off = [known.index(p) if p in known else len(known) for p in parts]
        return methods.index(r.method), len(off), off, r.variant

    return sorted(labels, key=key)


def _rank(report: Report) -> None:
    """Mark the best and second-best mean of every column, at the shown precision."""
    for column in report.columns:
        if column[1] in COST_COLUMNS:
            continue
        cells = [report.cells[(row, column)] for row in report.rows
                 if (row, column) in report.cells]
        shown = sorted({round(100 * c.mean, 2) for c in cells}, reverse=True)
        for cell in cells:
            place = shown.index(round(100 * cell.mean, 2)) + 1
            cell.rank = place if place <= 2 else 0


def build_report(found: Found, split: str = "test") -> Report:
    """Group the results by row, dataset and seed; one cell per row and column."""
    if not found.results:
        listed = "; ".join([*map(str, found.unevaluated), *found.skipped][:5])
        raise CcatError(f"no evaluated runs to report ({listed}); evaluate each run with "
                        f"`ccat eval --ckpt RUN/best.pt --json RUN/{EVAL_NAME}`")
    by_seed: dict[tuple[str, str, int], RunResult] = {}
    columns: dict[str, dict[str, None]] = {}
    for r in found.results:
        key = (r.row, r.dataset, r.seed)
        if key in by_seed:
            raise CcatError(f"{by_seed[key].path} and {r.path} are both {r.row} on {r.dataset} "
                            f"with seed {r.seed}; pass RUN_DIRs that hold only one of them")
        by_seed[key] = r
        columns.setdefault(r.dataset, {"fused": None}).update(dict.fromkeys(r.values))
    rows = _row_order(found.results)
    selections: dict[str, list[str]] = {}
    protocols: dict[str, list[str]] = {}
    for row in rows:
        for text in dict.fromkeys(r.selection for r in found.results if r.row == row):
            selections.setdefault(text, []).append(row)
        for name in dict.fromkeys(r.protocol for r in found.results if r.row == row):
            protocols.setdefault(name, []).append(row)
    cells: dict[tuple[str, tuple[str, str]], Cell] = {}
    for (row, dataset, seed), r in sorted(by_seed.items(), key=lambda kv: kv[0][2]):
        for name, value in r.values.items():
            cell = cells.setdefault((row, (dataset, name)), Cell([], []))
            cell.values.append(value)
            cell.seeds.append(seed)
    notes = [f"not evaluated (no {EVAL_NAME}): {p}" for p in found.unevaluated]
    notes += [f"skipped {s}" for s in found.skipped]
    report = Report(split, rows, [(d, a) for d, names in columns.items()
                                  for a in sorted(names, key=_column_kind)],
                    cells, {r.row: (r.method, r.variant) for r in found.results}, notes,
                    selections, protocols)
    _rank(report)
    return report


def _column_kind(name: str) -> int:
    """Column order within a dataset: accuracies, probes, training cost (stable within)."""
    if name in COST_COLUMNS:
        return 2
    return 1 if name.startswith(PROBE_PREFIX) else 0


def format_cell(cell: Cell | None, seeds: int, column: str = "fused") -> str:
    """'71.24 ± 0.81' in percent (a cost column: '12.3 ± 0.4' in its unit); '(n=2)' when
    the cell has fewer seeds than the table."""
    if cell is None:
        return "—"
    scale, digits = (1, 1) if column in COST_COLUMNS else (100, 2)
    text = f"{scale * cell.mean:.{digits}f}"
    if cell.std is not None:
        text += f" ± {scale * cell.std:.{digits}f}"
    if len(cell.values) < seeds:
        text += f" (n={len(cell.values)})"
    return text


def _over(report: Report) -> str:
    """'3 seeds', and where some cells have fewer, that they say so."""
    n = report.seeds
    fewer = any(len(c.values) < n for c in report.cells.values())
    return f"{n} seed{'s' if n > 1 else ''}" + (", fewer where a cell says n=k" if fewer else "")


def _selection_sentence(report: Report) -> str:
    """'best.pt: best fused accuracy on 'val', ties to the later epoch.' (per row group
    where runs differ)."""
    if len(report.selections) == 1:
        return f"best.pt: {next(iter(report.selections))}."
    parts = [f"{text} ({', '.join(rows)})" for text, rows in report.selections.items()]
    return f"best.pt: {'; '.join(parts)}."


def _cells_sentence(report: Report) -> str:
    """What the cells are."""
    return (f"{report.split.capitalize()} accuracy (%) of the fused prediction and of each "
            f"modality alone (Sec. 4.1: each method reads a modality its own way, so these "
            f"are not comparable across methods); probe columns: a linear probe on each frozen "
            f"encoder's pooled features, the same measure for every method and so comparable "
            f"across them; {TRAIN_TIME}: training wall-clock summed over the run's epochs, "
            f"{THROUGHPUT}: training samples per second; mean ± sample std over "
            f"{_over(report)}; — where a run has no such value.")


def _protocol_sentence(report: Report) -> str:
    """'Protocol shared: the config's optimizer, ... for every method.' (per row group
    where runs differ)."""
    if len(report.protocols) <= 1:
        name = next(iter(report.protocols), "shared")
        return f"Protocol {name}: {PROTOCOLS.get(name, name)}."
    parts = [f"{name} ({', '.join(rows)}): {PROTOCOLS.get(name, name)}"
             for name, rows in report.protocols.items()]
    return f"Protocols: {'; '.join(parts)}."


def caption(report: Report) -> str:
    """Which protocol trained the runs, what the cells are, how the checkpoints were chosen
    and what the marks mean."""
    return (f"{_protocol_sentence(report)} {_cells_sentence(report)} "
            f"{_selection_sentence(report)} {CAPTION_MARKS} (accuracies and probes).")


def to_markdown(report: Report) -> str:
    """The table as GitHub Markdown, caption first, notes after."""
    head = ["method", *(f"{d} {a}" for d, a in report.columns)]
    lines = [caption(report), "", "| " + " | ".join(head) + " |",
             "| --- |" + " ---: |" * len(report.columns)]
    for row in report.rows:
        cells = []
        for column in report.columns:
            cell = report.cells.get((row, column))
            text = format_cell(cell, report.seeds, column[1])
            if cell is not None and cell.rank:
                text = f"**{text}**" if cell.rank == 1 else f"<u>{text}</u>"
            cells.append(text)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    if report.notes:
        lines += ["", *(f"- {note}" for note in report.notes)]
    return "\n".join(lines) + "\n"


def to_csv(report: Report) -> str:
    """One line per row and column: mean and sample std as fractions, seeds, rank."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in report.rows:
        method, variant = report.identity[row]
        for dataset, name in report.columns:
            cell = report.cells.get((row, (dataset, name)))
            if cell is None:
                continue
            writer.writerow({"row": row, "method": method, "variant": variant,
                             "dataset": dataset, "accuracy": name, "mean": cell.mean,
                             "std": "" if cell.std is None else cell.std,
                             "n": len(cell.values), "seeds": " ".join(map(str, cell.seeds)),
                             "rank": cell.rank or ""})
    return buf.getvalue()


def to_rich(report: Report) -> Table:
    """The table for the terminal: best in bold, second best underlined."""
    table = Table(title=f"{report.split} accuracy (%), mean ± std over {_over(report)}",
                  caption=f"{escape(_protocol_sentence(report))} "
                          f"{escape(_cells_sentence(report))} "
                          f"{escape(_selection_sentence(report))} [bold]bold[/bold]: best in "
                          f"its column; [underline]underlined[/underline]: second best "
                          f"(accuracies and probes)")
    table.add_column("method")
    for dataset, name in report.columns:
        table.add_column(f"{dataset}\n{name}", justify="right")
    styles = {1: "bold", 2: "underline"}
    for row in report.rows:
        cells = []
        for column in report.columns:
            cell = report.cells.get((row, column))
            text = format_cell(cell, report.seeds, column[1])
            cells.append(f"[{styles[cell.rank]}]{text}[/]" if cell and cell.rank else text)
        table.add_row(row, *cells)
    return table


def report(paths: list[Path], fmt: str = "table", out: Path | None = None,
           split: str = "test") -> Report:
    """``ccat report``: find, group, print in ``fmt`` and write OUT/table.md and table.csv."""
    if fmt not in FORMATS:
        raise CcatError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    found = find_runs(paths, split)
    for name in (TABLE_MD, TABLE_CSV) if out is not None else ():
        outputs.check_output(out / name, "--out", found.inputs)
    result = build_report(found, split)
    console, notes = make_console(), make_console(stderr=True)
    if fmt == "table":
        console.print(to_rich(result))
        for note in result.notes:
            console.print(f"note: {note}", highlight=False, markup=False)
    else:
        sys.stdout.write(to_markdown(result) if fmt == "markdown" else to_csv(result))
        if fmt == "csv":
            for note in result.notes:
                notes.print(f"note: {note}", highlight=False, markup=False)
    if out is not None:
        outputs.write_text(out / TABLE_MD, to_markdown(result), "--out")
        outputs.write_text(out / TABLE_CSV, to_csv(result), "--out")
        notes.print(f"wrote {out / TABLE_MD} and {out / TABLE_CSV}", highlight=False)
    return result
