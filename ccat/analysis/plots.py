"""Figures drawn on matplotlib's Agg canvas: no display, no pyplot global state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ccat import outputs

DPI = 110  # about 770 x 440 px for the default size: readable, well under 150 KB as PNG


def new_figure(rows: int = 1, size: tuple[float, float] = (7.0, 4.0),
               heights: list[float] | None = None,
               columns: int = 1) -> tuple[Figure, list[Any]]:
    """A figure with ``rows`` stacked axes sharing the x axis, or with ``columns`` panels
    side by side sharing the y axis; the axes row by row."""
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, sharex=columns == 1, sharey=columns > 1, squeeze=False,
                        gridspec_kw={"height_ratios": heights} if heights else None)
    return fig, list(axes.ravel())


def save(fig: Figure, path: Path, title: str, option: str = "--out") -> Path:
    """Write ``fig`` as PNG to ``path`` atomically (folders made as needed; a failure
    names ``option``, the command's option for the place), with ``title`` (the run folder
    and method) drawn at its top and stored as the PNG's Title text."""
    fig.suptitle(title, fontsize=10)
    with outputs.output_file(path, option) as out:
        fig.savefig(out, format="png", metadata={"Title": title})
    return path


def run_title(run: str | Path, method: str | None) -> str:
    """The figures' title: the run folder, and the method when it is known."""
    return f"{run}: {method}" if method else str(run)
