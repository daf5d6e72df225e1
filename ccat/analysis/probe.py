"""``ccat probe``: how well each encoder learned, measured the same way for every method.

A method's own unimodal accuracy (Sec. 4.1) reads each modality through whatever that
method has (its own head, a block of the fused head, the fusion with the other modality
zeroed), so it is not comparable across methods. The linear probe is: the checkpoint's
encoders are frozen (eval mode, ``ccat eval``'s loader without augmentation), every train
and evaluated sample's pooled feature z^m is taken (:func:`ccat.analysis.collect.collect`,
the features ``ccat export`` writes), and per modality a multinomial logistic regression on
standardized features is fitted on the train split and scored on the evaluated split.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ccat import outputs
from ccat.analysis.collect import Collected, collect_open
from ccat.checkpoint import OpenCheckpoint, open_checkpoint
from ccat.errors import CcatError
from ccat.evaluate import value_table
from ccat.run_dir import run_block
from ccat.ui import make_console

console = make_console()

FIT_SPLIT = "train"
MAX_ITER = 2000  # lbfgs iterations; standardized features converge well within this


def fit_probe(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray,
              test_labels: np.ndarray, seed: int) -> tuple[float, bool]:
    """(test accuracy, whether the fit converged) of a seeded multinomial logistic
    regression on standardized features, fitted on ``train``."""
    model = make_pipeline(StandardScaler(),
                          LogisticRegression(max_iter=MAX_ITER, random_state=seed))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(train, train_labels)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return float((model.predict(test) == test_labels).mean()), converged


def probe_accuracies(train: Collected, test: Collected,
                     seed: int) -> tuple[dict[str, float], dict[str, bool]]:
    """Per modality, the probe's accuracy on ``test`` after fitting on ``train``, and
    whether its fit converged."""
    classes = np.unique(train.labels)
    if len(classes) < 2:
        raise CcatError(f"the {train.split!r} split holds only class "
                        f"{train.classes[int(classes[0])]!r} (or no sample), and a probe needs "
                        f"at least two classes to fit; rebuild the data with more samples")
    fits = {m: fit_probe(train.embeddings[m], train.labels, test.embeddings[m], test.labels,
                         seed) for m in train.modalities}
    return {m: acc for m, (acc, _) in fits.items()}, {m: ok for m, (_, ok) in fits.items()}


def linear_probe(ckpt_path: str | Path, data: str | None = None, split: str = "test",
                 device: str | None = None) -> dict[str, Any]:
    """The probe of ``ckpt_path`` scored on ``split``, with what identifies the run; the
    features are taken on ``device`` (default: the run's)."""
    check_split(split)
    with open_checkpoint(ckpt_path, data, device, (FIT_SPLIT, split)) as opened:
        return probe_checkpoint(opened, split)


def check_split(split: str) -> None:
    if split == FIT_SPLIT:
        raise CcatError(f"the probe is fitted on {FIT_SPLIT!r}; score it on another split "
                        f"(--split test or val)")


def probe_checkpoint(opened: OpenCheckpoint, split: str) -> dict[str, Any]:
    """The probe of an opened checkpoint (``ccat probe``, ``ccat eval --probe``), each
    split's features predicted once per opening."""
    check_split(split)
    cfg = opened.cfg
    train, test = collect_open(opened, FIT_SPLIT), collect_open(opened, split)
    accuracy, converged = probe_accuracies(train, test, cfg.seed)
    for m in (m for m, ok in converged.items() if not ok):
        console.print(f"warning: the {m} probe did not converge in {MAX_ITER} lbfgs "
                      f"iterations; its accuracy is that of the last iterate",
                      highlight=False, markup=False)
    return {"split": split, "probe": accuracy, "probe_converged": converged,
            "num_samples": {FIT_SPLIT: len(train.keys), split: len(test.keys)},
            "probe_seed": cfg.seed, "run": run_block(cfg, test.dataset),
            "selection": opened.ckpt.selection_block(), "checkpoint": str(opened.path),
            "fingerprint": test.fingerprint}


def probe_table(result: dict[str, Any], title: str) -> Table:
    """The probe's accuracy per modality, as ``ccat eval``'s table shows metrics."""
    return value_table(title, [("probe", result["probe"])])


def probe(ckpt_path: str | Path, data: str | None = None, split: str = "test",
          json_path: str | Path | None = None, device: str | None = None) -> dict[str, Any]:
    """``ccat probe``: print the probe's table and write its JSON to ``json_path``
    (checked before any work, :func:`ccat.outputs.check_output`)."""
    if json_path:
        json_path = outputs.check_output(json_path, "--json", [ckpt_path])
    result = linear_probe(ckpt_path, data, split, device)
    console.print(probe_table(result, f"linear probe of {ckpt_path}: fit on {FIT_SPLIT!r}, "
                                      f"scored on {split!r}"))
    if json_path:
        outputs.write_text(json_path, json.dumps(result, indent=2) + "\n", "--json")
    return result
