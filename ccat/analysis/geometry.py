"""Feature geometry (the paper's Figure 5): t-SNE of a split's representations coloured by
class, and how well the classes cluster: Calinski-Harabasz (higher is better), Silhouette
(higher) and Davies-Bouldin (lower), on the representations and on the 2-D map."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.manifold import TSNE
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score
from threadpoolctl import threadpool_limits

from ccat import outputs, run_dir
from ccat.analysis.collect import Collected, collect
from ccat.analysis.plots import new_figure, run_title, save
from ccat.errors import CcatError

TSNE_PERPLEXITY = 30.0  # scikit-learn's default; smaller splits get (N - 1) / 3
TSNE_SEED = 0


def cluster_scores(features: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Calinski-Harabasz, Silhouette (Euclidean) and Davies-Bouldin of ``labels`` as
    clusters of ``features`` (N, D)."""
    present = len(np.unique(labels))
    if not 2 <= present <= len(labels) - 1:
        raise CcatError(f"cluster scores need between 2 and N - 1 classes present, got "
                        f"{present} among {len(labels)} samples; use a larger split")
    return {"calinski_harabasz": float(calinski_harabasz_score(features, labels)),
            "silhouette": float(silhouette_score(features, labels)),
            "davies_bouldin": float(davies_bouldin_score(features, labels))}


def tsne_map(features: np.ndarray) -> np.ndarray:
    """A seeded 2-D t-SNE (PCA initialization) of ``features`` (N, D)."""
    perplexity = min(TSNE_PERPLEXITY, max(1.0, (len(features) - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=TSNE_SEED)
    return tsne.fit_transform(features.astype(np.float64))


def plot_tsne(points: np.ndarray, got: Collected, scores: dict[str, float], path: Path,
              title: str) -> Path:
    """The 2-D map, one colour per class, the representation's scores in the axes' title."""
    fig, (ax,) = new_figure(size=(5.6, 5.0))
    for c, name in enumerate(got.classes):
        mask = got.labels == c
        ax.scatter(points[mask, 0], points[mask, 1], s=16, color=f"C{c % 10}", label=name,
                   alpha=0.8, linewidths=0)
    ax.set_title(f"{got.method} ({got.stage}), {got.split}: CH {scores['calinski_harabasz']:.1f}"
                 f"  SI {scores['silhouette']:.3f}  DBI {scores['davies_bouldin']:.2f}",
                 fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=1.5, loc="best")
    return save(fig, path, title)


def geometry_files(ckpt: str | Path, split: str = "test",
                   out: str | Path | None = None) -> dict[str, Path]:
    """Where :func:`feature_geometry` writes: ``tsne_<split>.png`` and
    ``clusters_<split>.json`` in ``out`` (default: the checkpoint's folder / analysis)."""
    folder = Path(out) if out else Path(ckpt).parent / run_dir.ANALYSIS_DIR
    return {"tsne": folder / f"tsne_{split}.png", "scores": folder / f"clusters_{split}.json"}


def feature_geometry(ckpt: str | Path, data: str | None = None, split: str = "test",
                     out: str | Path | None = None,
                     device: str | None = None) -> dict[str, Any]:
    """Write :func:`geometry_files` from ``ckpt``'s representations of ``split`` (taken on
    ``device``, default the run's); returns the JSON's content with the file paths."""
    got = collect(ckpt, data, split, device)
    with threadpool_limits(torch.get_num_threads()):  # the run's CPU threads (config `threads`)
        points = tsne_map(got.representation)
    result = {"checkpoint": str(ckpt), "method": got.method, "stage": got.stage,
              "split": split, "num_samples": len(got.keys),
              "representation_dim": int(got.representation.shape[1]),
              "representation": cluster_scores(got.representation, got.labels),
              "tsne": cluster_scores(points, got.labels)}
    files = geometry_files(ckpt, split, out)
    plot_tsne(points, got, result["representation"], files["tsne"],
              run_title(Path(ckpt).parent, got.method))
    outputs.write_text(files["scores"], json.dumps(result, indent=2) + "\n", "--out")
    return {**result, "files": files}
