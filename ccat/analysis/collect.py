"""Everything a checkpoint predicts for every sample of a split, kept per sample.

Evaluation keeps argmaxes only; analysis and export need the logits, the pooled
embeddings z^m, the representation the fused prediction is read from and the
contributions. Batches and contributions are those of ``ccat eval`` (same loader, same
batch-level Eq. 5-6 estimator), so the numbers agree with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from ccat import checkpoint, distributed
from ccat.config import RunConfig, from_dict
from ccat.data.pipeline import make_loader
from ccat.data.reader import BuiltDataset
from ccat.errors import CcatError
from ccat.evaluate import autocast, checkpoint_dataset, load_for_eval
from ccat.methods import Method, Outputs
from ccat.models import MultimodalModel
from ccat.ui import make_console

console = make_console()


@dataclass
class Collected:
    """Per-sample outputs of one checkpoint on one split, in loader order."""

    keys: list[str]
    labels: np.ndarray  # (N,) int64
    fused: np.ndarray  # (N, C) fused logits
    unimodal: dict[str, np.ndarray]  # modality -> (N, C) logits
    embeddings: dict[str, np.ndarray]  # modality -> (N, D) pooled z^m
    representation: np.ndarray  # (N, R) the vector the fused prediction is read from
    contributions: dict[str, np.ndarray]  # modality -> (N,), summing to 1 over modalities
    classes: list[str]
    modalities: list[str]
    method: str
    stage: str
    split: str
    checkpoint: str
    fingerprint: str
    dataset: str  # the manifest's name of the data


def collect(ckpt_path: str | Path, data: str | None = None, split: str = "test") -> Collected:
    """Run the checkpoint over every sample of ``split`` once, on one process."""
    ckpt = checkpoint.load(ckpt_path)
    cfg = from_dict(ckpt["config"])
    dataset = checkpoint_dataset(ckpt, ckpt_path, data, split)
    device = distributed.setup(cfg.device).device
    try:
        if device.type == "cpu":
            distributed.configure_cpu(cfg.deterministic, cfg.threads)
        method, model = load_for_eval(ckpt, dataset, device)
        rows = _predict_all(method, model, dataset, split, cfg, device)
    finally:
        distributed.cleanup()
    if len(rows["keys"]) != dataset.num_samples(split):
        raise CcatError(f"{dataset.root} split {split!r} gave {len(rows['keys'])} samples but "
                        f"its manifest lists {dataset.num_samples(split)}; run "
                        f"`ccat-data verify {dataset.root}`")
    modalities = list(model.modalities)
    cat = {k: np.concatenate(v) for k, v in rows.items() if k != "keys"}
    return Collected(
        keys=rows["keys"], labels=cat["labels"], fused=cat["fused"],
        unimodal={m: cat[f"logits/{m}"] for m in modalities},
        embeddings={m: cat[f"embeddings/{m}"] for m in modalities},
        representation=cat["representation"],
        contributions={m: cat[f"contributions/{m}"] for m in modalities},
        classes=list(dataset.classes), modalities=modalities, method=cfg.method.name,
        stage=ckpt["stage"], split=split, checkpoint=str(ckpt_path),
        fingerprint=dataset.fingerprint, dataset=dataset.name)


@torch.no_grad()
def _predict_all(method: Method, model: MultimodalModel, dataset: BuiltDataset, split: str,
                 cfg: RunConfig, device: torch.device) -> dict[str, list]:
    """Batches of ``ccat eval``'s loader -> lists of per-batch numpy arrays by name."""
    model.eval()
    rows: dict[str, list] = {"keys": []}
    loader = make_loader(dataset, split, cfg.data, train=False, seed=0, rank=0, world=1)
    progress = Progress(TextColumn(f"{split}"), BarColumn(), MofNCompleteColumn(),
                        console=console, transient=True)
    with progress:
        task = progress.add_task(split, total=dataset.num_samples(split))
        for batch in loader:
            batch = batch.to(device)
            with autocast(device):
                out = method.predict(model, batch)
            for name, value in _arrays(out, method).items():
                rows.setdefault(name, []).append(value)
            rows.setdefault("labels", []).append(batch.label.cpu().numpy())
            rows["keys"] += batch.keys
            progress.update(task, advance=len(batch.keys))
    return rows


def _arrays(out: Outputs, method: Method) -> dict[str, np.ndarray]:
    """One batch's outputs as float32 numpy arrays named as in the HDF5 layout; the
    contributions measured with the method's estimator, as ``ccat eval`` measures them."""
    if out.representation is None or not out.embeddings:
        raise CcatError(f"method {method.cfg.name!r} gives no embeddings or representation in its "
                        f"predict(); fill Outputs.embeddings and Outputs.representation")
    shares = method.estimator({m: v.float() for m, v in out.unimodal.items()},
                              out.fused.float())  # Eq. 5-6
    arrays = {"fused": out.fused, "representation": out.representation}
    arrays.update({f"logits/{m}": v for m, v in out.unimodal.items()})
    arrays.update({f"embeddings/{m}": v for m, v in out.embeddings.items()})
    arrays.update({f"contributions/{m}": v for m, v in shares.items()})
    return {k: v.float().cpu().numpy() for k, v in arrays.items()}
