"""Curves of a run from its metrics.jsonl: contribution evolution (the paper's Figure 1)
and validation accuracy, fused and per modality, over the epochs of every stage."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from ccat import run_dir
from ccat.config import read_yaml
from ccat.analysis.plots import new_figure, run_title, save
from ccat.errors import CcatError

VAL_ACC = re.compile(r"^(?P<split>[^/]+)/acc/fused$")
SELECTED_STYLES = ["o-", "s--", "^:", "d-."]  # equal fractions (often all 0) stay visible


@dataclass
class History:
    """A run's epoch rows with what the plots need to read them."""

    rows: list[dict[str, Any]]
    val: str  # the split validation metrics were logged under
    modalities: list[str]
    beta: float | None  # ccat's secondary-update threshold, from the run's config.yaml
    title: str  # the run folder and its method, drawn above each figure

    @property
    def epochs(self) -> list[int]:
        """Global epoch numbers, counted across stages (1, 2, ...)."""
        return list(range(1, len(self.rows) + 1))

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(epochs, values) of the rows that have ``key``."""
        pairs = [(x, row[key]) for x, row in zip(self.epochs, self.rows) if key in row]
        return [x for x, _ in pairs], [v for _, v in pairs]

    def stage_spans(self) -> list[tuple[str, float, float]]:
        """(stage, first epoch - 0.5, last epoch + 0.5) for each stage in order."""
        spans: list[tuple[str, float, float]] = []
        for x, row in zip(self.epochs, self.rows):
            if spans and spans[-1][0] == row["stage"]:
                spans[-1] = (row["stage"], spans[-1][1], x + 0.5)
            else:
                spans.append((row["stage"], x - 0.5, x + 0.5))
        return spans


def read_history(run: str | Path) -> History:
    """The run folder's metrics.jsonl (and beta from its config.yaml)."""
    run = Path(run)
    path = run / run_dir.METRICS
    if not path.is_file():
        raise CcatError(f"{run} has no {run_dir.METRICS}; pass a run folder written by "
                        f"`ccat train`")
    rows = run_dir.read_metrics(run)
    found = [m.group("split") for row in rows[:1] for m in map(VAL_ACC.match, row) if m]
    if not rows or not found:
        raise CcatError(f"{path} has no epoch with a validation accuracy; train at least one "
                        f"epoch first")
    val = found[0]
    acc = f"{val}/acc/"
    modalities = [k[len(acc):] for k in rows[0] if k.startswith(acc) and k != f"{acc}fused"]
    config = run / run_dir.CONFIG
    method = read_yaml(config).get("method", {}) if config.is_file() else {}
    beta = None
    if any(k.startswith("selected/") for row in rows for k in row) and "beta" in method.get(
            "params", {}):
        beta = float(method["params"]["beta"])
    return History(rows, val, modalities, beta, run_title(run, method.get("name")))


def _mark_stages(ax: Any, history: History) -> None:
    """Shade alternate stages, draw the boundaries and name each stage at the top."""
    for i, (stage, start, stop) in enumerate(history.stage_spans()):
        if i:
            ax.axvline(start, color="0.3", linestyle="--", linewidth=1)
        if i % 2:
            ax.axvspan(start, stop, color="0.94", zorder=0)
        ax.text((start + stop) / 2, 1.01, stage, transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=9, color="0.3")


def plot_contributions(history: History, path: Path) -> Path:
    """Mean contribution of each modality per epoch (Figure 1): validation (solid) and
    training batches (dashed); below it, when logged, the fraction of samples selected for
    secondary updates with beta marked on the contribution axis."""
    selected = [f"selected/{m}" for m in history.modalities
                if any(f"selected/{m}" in row for row in history.rows)]
    fig, axes = new_figure(2 if selected else 1, (7.0, 5.2 if selected else 4.0),
                           [3, 1.3] if selected else None)
    ax = axes[0]
    for i, m in enumerate(history.modalities):
        color = f"C{i}"
        ax.plot(*history.series(f"{history.val}/contrib/{m}"), "o-", color=color, ms=3,
                label=f"{m} ({history.val})")
        xs, ys = history.series(f"contrib/{m}")
        if xs:
            ax.plot(xs, ys, "--", color=color, alpha=0.7, label=f"{m} (train batches)")
    if history.beta is not None:
        ax.axhline(history.beta, color="0.5", linestyle=":", linewidth=1)
        ax.text(history.epochs[0] - 0.4, history.beta, f" beta {history.beta:g}",
                va="bottom", fontsize=8, color="0.4")
    ax.axhline(1 / max(1, len(history.modalities)), color="0.75", linewidth=0.8)
    ax.set_ylabel("mean contribution")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="best")
    _mark_stages(ax, history)
    if selected:
        top = 0.05
        for i, key in enumerate(selected):
            xs, ys = history.series(key)
            axes[1].plot(xs, ys, SELECTED_STYLES[i % len(SELECTED_STYLES)], color=f"C{i}", ms=4,
                         label=key)
            top = max([top, *(1.15 * y for y in ys)])
        axes[1].set_ylim(-0.04 * top, top)
        axes[1].set_ylabel("selected")
        axes[1].legend(fontsize=7, loc="upper left")
        _mark_stages(axes[1], history)
    axes[-1].set_xlabel("epoch (all stages)")
    return save(fig, path, history.title)


def plot_accuracy(history: History, path: Path) -> Path:
    """Validation accuracy per epoch: the fused prediction and each modality's own."""
    fig, (ax,) = new_figure()
    ax.plot(*history.series(f"{history.val}/acc/fused"), "o-", color="k", lw=2, ms=3,
            label="fused")
    for i, m in enumerate(history.modalities):
        ax.plot(*history.series(f"{history.val}/acc/{m}"), "o-", color=f"C{i}", ms=3, label=m)
    ax.set_xlabel("epoch (all stages)")
    ax.set_ylabel(f"{history.val} accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="best")
    _mark_stages(ax, history)
    return save(fig, path, history.title)


def curve_files(run: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """Where :func:`plot_run` writes: RUN/plots/ (or ``out``) contributions.png and
    accuracy.png."""
    folder = Path(out) if out else Path(run) / run_dir.PLOTS_DIR
    return {"contributions": folder / "contributions.png", "accuracy": folder / "accuracy.png"}


def plot_run(run: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """Write the run's curves to :func:`curve_files`."""
    history = read_history(run)
    files = curve_files(run, out)
    return {"contributions": plot_contributions(history, files["contributions"]),
            "accuracy": plot_accuracy(history, files["accuracy"])}
