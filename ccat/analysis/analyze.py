"""``ccat analyze``: a run's curves from its metrics.jsonl, a checkpoint's feature geometry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from ccat import outputs, run_dir
from ccat.analysis.curves import curve_files, plot_run
from ccat.analysis.geometry import feature_geometry, geometry_files
from ccat.errors import CcatError
from ccat.ui import make_console

console = make_console()


def analyze(run: str | Path | None = None, ckpt: str | Path | None = None, tsne: bool = False,
            split: str = "test", data: str | None = None, out: str | Path | None = None,
            device: str | None = None) -> dict[str, Path]:
    """Curves of ``run`` (RUN/plots/ or ``out``); with ``tsne``, the geometry of ``ckpt``'s
    (default RUN/best.pt) representations on ``split`` (its folder's analysis/ or ``out``),
    taken on ``device`` (default: the run's). Every file is checked before any work
    (:func:`ccat.outputs.check_output`). Prints and returns the files written."""
    if run is None and ckpt is None:
        raise CcatError("nothing to analyze: give a run folder (ccat analyze RUN) or a "
                        "checkpoint with --ckpt CKPT --tsne")
    if ckpt is not None and not tsne:
        raise CcatError(f"--ckpt {ckpt} needs --tsne (the checkpoint analysis); per-sample "
                        f"outputs come from `ccat export --ckpt {ckpt}`")
    ckpt = ckpt or Path(run) / run_dir.BEST
    check_outputs(run, ckpt, tsne, split, out)
    files: dict[str, Path] = {}
    if run is not None:
        files.update(plot_run(run, out))
    scores: dict[str, Any] = {}
    if tsne:
        result = feature_geometry(ckpt, data, split, out, device)
        files.update(result["files"])
        scores = {k: result[k] for k in ("representation", "tsne")}
    console.print(files_table(files))
    if scores:
        console.print(scores_table(scores))
    return files


def check_outputs(run: str | Path | None, ckpt: str | Path, tsne: bool, split: str,
                  out: str | Path | None) -> None:
    """Refuse, before any work, a file :func:`analyze` would write that is one of its
    inputs (the run's files, the checkpoint) or may not be written there."""
    inputs = [ckpt] if run is None else [ckpt, *(Path(run) / n for n in run_dir.RUN_FILES)]
    planned = {**(curve_files(run, out) if run is not None else {}),
               **(geometry_files(ckpt, split, out) if tsne else {})}
    for path in planned.values():
        outputs.check_output(path, "--out", inputs)


def files_table(files: dict[str, Path]) -> Table:
    table = Table(title="analysis written")
    table.add_column("what")
    table.add_column("file")
    for name, path in files.items():
        table.add_row(name, str(path))
    return table


def scores_table(scores: dict[str, dict[str, float]]) -> Table:
    """Cluster scores per feature space: Calinski-Harabasz and silhouette (higher is better),
    Davies-Bouldin (lower is better)."""
    table = Table(title="cluster scores by class (CH and SI: higher is better; DBI: lower)")
    table.add_column("features")
    for column in ("CH (Calinski-Harabasz)", "SI (silhouette)", "DBI (Davies-Bouldin)"):
        table.add_column(column, justify="right")
    for space, name in (("representation", "representation"), ("tsne", "t-SNE map (2-D)")):
        values = scores[space]
        table.add_row(name, f"{values['calinski_harabasz']:.1f}", f"{values['silhouette']:.3f}",
                      f"{values['davies_bouldin']:.2f}")
    return table
