"""Everything a checkpoint predicts for every sample of a split, kept per sample, with
what identifies the checkpoint and its data.

The arrays are those of ``ccat eval``'s one prediction loop (:func:`ccat.predict.predict`:
same loader, same batch-level Eq. 5-6 estimator), so the numbers agree with it; export,
the probe and the feature geometry read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from ccat import checkpoint, distributed
from ccat.config import from_dict
from ccat.evaluate import DEVICE_FIX, checkpoint_dataset, load_for_eval
from ccat.predict import Predictions, predict


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
    """Run the checkpoint over every sample of ``split`` once, on one process (each
    process under torchrun predicts all of it), on ``device_name`` (default: the run's)."""
    ckpt = checkpoint.load(ckpt_path)
    cfg = from_dict(ckpt["config"])
    dataset = checkpoint_dataset(ckpt, ckpt_path, data, split)
    device = distributed.setup(device_name or cfg.device, DEVICE_FIX).device
    try:
        if device.type == "cpu":
            distributed.configure_cpu(cfg.deterministic, cfg.threads)
        method, model = load_for_eval(ckpt, dataset, device, ckpt_path)
        pred = predict(method, model, dataset, split, distributed.Context(0, 1, device), cfg,
                       progress=True)
    finally:
        distributed.cleanup()
    return Collected(**{f.name: getattr(pred, f.name) for f in fields(Predictions)},
                     classes=list(dataset.classes), modalities=list(model.modalities),
                     method=cfg.method.name, stage=ckpt["stage"], split=split,
                     checkpoint=str(ckpt_path), fingerprint=dataset.fingerprint,
                     dataset=dataset.name)
