"""``ccat summary``: what a comparison of a few methods says about modality imbalance.

From evaluated runs (``ccat eval --probe``), one small table: per method the fused test
accuracy, each modality's linear probe (the same measure for every method) and CCAT's
fraction of training samples picked for secondary updates (``n/a`` for methods without
them); then three sentences generated from those numbers: which modality dominated under
the baseline (the one whose probe is highest there, by default under ``concat``); how far
the weak modality (the lowest probe there) is from its unimodal level, the probe of a
``unimodal`` run (each modality trained alone), under each method; and how far each
method's fused accuracy is from the unimodal ensemble's (the ``unimodal`` run's fused
prediction, the mean of the two heads trained alone). Without a unimodal run the last two
compare each method with the baseline instead. Cells with several seeds are means over
them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from ccat import outputs, run_dir
from ccat.errors import CcatError
from ccat.report import PROBE_PREFIX, Found, Report, build_report, find_runs
from ccat.ui import make_console

BASELINE = "concat"  # the plain fusion whose imbalance the story describes
REFERENCE = "unimodal"  # each modality trained alone: its probe is the modality's own level
NOT_APPLICABLE = "n/a"
POINTS_DIGITS = 1  # numbers in the sentences: percent with one decimal


@dataclass(frozen=True)
class MethodNumbers:
    """One method's means over its seeds: fused accuracy and probes as fractions, and the
    fraction of samples selected for secondary updates per modality (None: no such updates)."""

    method: str
    fused: float
    probes: dict[str, float]
    selected: dict[str, float] | None
    seeds: int


def _points(fraction: float) -> float:
    """A fraction in percent at the precision the sentences show."""
    return round(100 * fraction, POINTS_DIGITS)


def _percent(fraction: float) -> str:
    return f"{_points(fraction):.{POINTS_DIGITS}f} %"


def dominant_and_weak(base: MethodNumbers) -> tuple[str, str]:
    """The modalities with the highest and the lowest probe under ``base`` (first in
    modality order on a tie)."""
    order = list(base.probes)
    return (max(order, key=lambda m: _points(base.probes[m])),
            min(order, key=lambda m: _points(base.probes[m])))


def dominance_sentence(base: MethodNumbers) -> str:
    """'Under concat, audio dominated: its probe reached 91.7 % against 20.8 % for video.'"""
    strong, weak = dominant_and_weak(base)
    if _points(base.probes[strong]) == _points(base.probes[weak]):
        return (f"Under {base.method}, no modality dominated: every modality's probe reached "
                f"{_percent(base.probes[strong])}.")
    others = ", ".join(f"{_percent(v)} for {m}" for m, v in base.probes.items() if m != strong)
    return (f"Under {base.method}, {strong} dominated: its probe reached "
            f"{_percent(base.probes[strong])} against {others}.")


def _offset(value: float, level: float) -> str:
    """'12.5 points below it', '4.2 points above it' or 'level with it'."""
    gap = round(_points(value) - _points(level), POINTS_DIGITS)
    if gap == 0:
        return "level with it"
    return f"{abs(gap):.{POINTS_DIGITS}f} points {'above' if gap > 0 else 'below'} it"


def _versus(row: MethodNumbers, base: MethodNumbers, weak: str) -> str:
    """'ccat lifts video 8.3 points above concat', '... leaves it 4.2 points below concat'
    or '... leaves it where concat has it'."""
    gap = round(_points(row.probes[weak]) - _points(base.probes[weak]), POINTS_DIGITS)
    if gap == 0:
        return f"{row.method} leaves {weak} where {base.method} has it"
    if gap > 0:
        return f"{row.method} lifts {weak} {gap:.{POINTS_DIGITS}f} points above {base.method}"
    return f"{row.method} leaves {weak} {-gap:.{POINTS_DIGITS}f} points below {base.method}"


def gap_sentence(rows: list[MethodNumbers], base: MethodNumbers,
                 reference: MethodNumbers | None) -> str:
    """How far the weak modality's probe is from its unimodal level under each method (or,
    without a reference run, from the baseline's). With one method besides the baseline and
    the reference (the demo), the sentence ends with how it compares with the baseline;
    with more, their distances from the level already say it."""
    _, weak = dominant_and_weak(base)
    compared = {base.method} | ({reference.method} if reference else set())
    others = [r for r in rows if r.method not in compared]
    versus = "; ".join(_versus(r, base, weak) for r in others)
    if reference is None:
        start = (f"Without a {REFERENCE} run to give {weak}'s own level, compare with "
                 f"{base.method}: ")
        return start + (f"{versus}." if others else "there is no other method to compare.")
    level = reference.probes[weak]
    under = ", ".join(f"under {r.method} {_offset(r.probes[weak], level)}"
                      for r in [base, *others])
    text = (f"Trained alone ({reference.method}), {weak}'s probe reaches {_percent(level)}; "
            f"{under}")
    return text + (f", so {versus}." if len(others) == 1 else ".")


def fused_sentence(rows: list[MethodNumbers], base: MethodNumbers,
                   reference: MethodNumbers | None) -> str:
    """'Fused, the unimodal ensemble (unimodal) reaches 97.9 %; concat is 12.5 points below
    it, ccat 2.1 points below it.' Without a reference run, against the baseline."""
    level = reference if reference is not None else base
    others = [r for r in rows if r.method != level.method]
    what = (f"the unimodal ensemble ({level.method})" if reference is not None
            else level.method)
    if not others:
        return f"Fused, {what} reaches {_percent(level.fused)}."
    told = ", ".join(f"{r.method} {'is ' if k == 0 else ''}{_offset(r.fused, level.fused)}"
                     for k, r in enumerate(others))
    return f"Fused, {what} reaches {_percent(level.fused)}; {told}."


def numbers_of(report: Report) -> list[MethodNumbers]:
    """Each full method's means (ablation variants are left out), in the report's order."""
    datasets = list(dict.fromkeys(d for d, _ in report.columns))
    if len(datasets) != 1:
        raise CcatError(f"the summary describes one dataset and these runs hold "
                        f"{', '.join(datasets)}; pass the runs of one dataset")
    dataset, rows = datasets[0], []
    for row in report.rows:
        method, variant = report.identity[row]
        if variant:
            continue
        cells = {name: report.cells[(row, (d, name))] for d, name in report.columns
                 if (row, (d, name)) in report.cells}
        probes = {name[len(PROBE_PREFIX):]: cell.mean for name, cell in cells.items()
                  if name.startswith(PROBE_PREFIX)}
        if not probes:
            raise CcatError(f"the {method} runs on {dataset} have no probe accuracies; "
                            f"evaluate them with `ccat eval --ckpt RUN/best.pt --probe "
                            f"--json RUN/eval.json`")
        rows.append(MethodNumbers(method, cells["fused"].mean, probes, None,
                                  len(cells["fused"].values)))
    return rows


def method_folders(found: Found) -> dict[str, list[Path]]:
    """The run folders of each full method (ablation variants left out)."""
    folders: dict[str, list[Path]] = {}
    for result in found.results:
        if not result.variant:
            folders.setdefault(result.method, []).append(result.path.parent)
    return folders


def with_selection(rows: list[MethodNumbers],
                   folders: dict[str, list[Path]]) -> list[MethodNumbers]:
    """``rows`` with each method's selected fractions: the mean over its run folders of
    :func:`ccat.run_dir.selected_fractions` (None when its runs record none)."""
    result = []
    for row in rows:
        found = [f for f in (run_dir.selected_fractions(p) for p in folders[row.method]) if f]
        selected = ({m: sum(f[m] for f in found) / len(found) for m in found[0]}
                    if found else None)
        result.append(MethodNumbers(row.method, row.fused, row.probes, selected, row.seeds))
    return result


@dataclass(frozen=True)
class Story:
    """The summary: the numbers and the three sentences made from them."""

    rows: list[MethodNumbers]
    sentences: tuple[str, str, str]


def tell(rows: list[MethodNumbers], baseline: str = BASELINE,
         reference: str = REFERENCE) -> Story:
    """The three sentences for ``rows``; the baseline must be among them, the reference may
    not."""
    by_method = {r.method: r for r in rows}
    if baseline not in by_method:
        raise CcatError(f"no {baseline} run among the runs given ({', '.join(by_method)}); "
                        f"the summary reads which modality dominated off it: train and "
                        f"evaluate one, or name another with --baseline")
    base = by_method[baseline]
    ref = by_method.get(reference) if reference != baseline else None
    return Story(rows, (dominance_sentence(base), gap_sentence(rows, base, ref),
                        fused_sentence(rows, base, ref)))


def story_of(found: Found, baseline: str = BASELINE, reference: str = REFERENCE,
             split: str = "test") -> Story:
    """The story of the evaluated runs ``found``."""
    rows = numbers_of(build_report(found, split))
    return tell(with_selection(rows, method_folders(found)), baseline, reference)


def _header(story: Story) -> list[str]:
    modalities = list(dict.fromkeys(m for r in story.rows for m in r.probes))
    return ["method", "fused", *(f"probe {m}" for m in modalities),
            *(f"selected {m}" for m in modalities)]


def _cells(story: Story) -> list[list[str]]:
    """Percent with one decimal; n/a where a method has no such value."""
    modalities = list(dict.fromkeys(m for r in story.rows for m in r.probes))
    table = []
    for r in story.rows:
        probes = [_percent(r.probes[m]) if m in r.probes else NOT_APPLICABLE for m in modalities]
        selected = [_percent(r.selected[m]) if r.selected and m in r.selected else NOT_APPLICABLE
                    for m in modalities]
        table.append([r.method, _percent(r.fused), *probes, *selected])
    return table


def caption(story: Story) -> str:
    """What the cells are."""
    seeds = max(r.seeds for r in story.rows)
    over = f", means over {seeds} seeds" if seeds > 1 else ""
    return (f"Test accuracy of the fused prediction, linear probe of each frozen encoder "
            f"(`ccat eval --probe`), and the fraction of training samples CCAT picked for "
            f"secondary updates in its stage 2{over}.")


def to_markdown(story: Story) -> str:
    """The table and the three sentences as GitHub Markdown."""
    header = _header(story)
    lines = [caption(story), "", "| " + " | ".join(header) + " |",
             "| --- |" + " ---: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in _cells(story)]
    return "\n".join([*lines, "", *story.sentences]) + "\n"


def to_rich(story: Story) -> Table:
    """The table for the terminal."""
    table = Table(title="summary", caption=caption(story).replace("`", ""))
    for k, name in enumerate(_header(story)):
        table.add_column(name, justify="left" if k == 0 else "right")
    for row in _cells(story):
        table.add_row(*row)
    return table


def summary(paths: list[Path], baseline: str = BASELINE, reference: str = REFERENCE,
            out: Path | None = None, split: str = "test") -> Story:
    """``ccat summary``: print the table and the sentences; write them to ``out`` as Markdown."""
    found = find_runs(paths, split)
    if out is not None:
        outputs.check_output(out, "--out", found.inputs)
    story = story_of(found, baseline, reference, split)
    console = make_console()
    console.print(to_rich(story))
    for sentence in story.sentences:
        console.print(sentence, highlight=False, markup=False)
    if out is not None:
        outputs.write_text(out, to_markdown(story), "--out")
        make_console(stderr=True).print(f"wrote {out}", highlight=False)
    return story
