"""Everything a checkpoint predicts for every sample of a split, kept per sample, with
what identifies the checkpoint and its data.

The arrays are those of ``ccat eval``'s one prediction loop (:func:`ccat.predict.predict`:
same loader, same batch-level Eq. 5-6 estimator), so the numbers agree with it; export,
the probe and the feature geometry read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from ccat.checkpoint import OpenCheckpoint, open_checkpoint
from ccat.predict import Predictions


@dataclass
class Collected(Predictions):
    """Per-sample outputs of one checkpoint on one split, in loader order."""

    classes: list[str]
    modalities: list[str]
    method: str
    stage: str
    split: str
    checkpoint: str
    fingerprint: str
    dataset: str  # the manifest's name of the data


def collect(ckpt_path: str | Path, data: str | None = None, split: str = "test",
            device_name: str | None = None) -> Collected:
    """Open the checkpoint and :func:`collect_open` ``split``, on ``device_name``
    (default: the run's)."""
    with open_checkpoint(ckpt_path, data, device_name, (split,)) as opened:
        return collect_open(opened, split)


def collect_open(opened: OpenCheckpoint, split: str) -> Collected:
    """The opened checkpoint over every sample of ``split``, on one process (each process
    under torchrun predicts all of it); predicted once per opening."""
    pred = opened.predict(split, whole=True, progress=True)
    return Collected(**{f.name: getattr(pred, f.name) for f in fields(Predictions)},
                     classes=list(opened.dataset.classes),
                     modalities=list(opened.model.modalities), method=opened.cfg.method.name,
                     stage=opened.ckpt.stage, split=split, checkpoint=str(opened.path),
                     fingerprint=opened.dataset.fingerprint, dataset=opened.dataset.name)
