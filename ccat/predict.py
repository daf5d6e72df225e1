"""The one prediction loop: everything a model predicts for every sample of a split.

``ccat eval`` (and the per-epoch validation of ``ccat train``) reads its metrics from it;
``ccat export``, ``ccat probe`` and ``ccat analyze`` read the same per-sample arrays
(:mod:`ccat.analysis.collect`): the logits of the fused prediction and of each modality,
the pooled embeddings z^m, the representation the fused prediction is read from, the
contributions (Eq. 5-6, batch-level, with the method's estimator), the
labels and the sample keys. Under torchrun every rank predicts its share of the split
and every rank gets the whole of it, in rank order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from ccat import distributed
from ccat.config import RunConfig
from ccat.data.device_cache import DeviceCache
from ccat.data.pipeline import make_loader
from ccat.data.reader import BuiltDataset
from ccat.errors import CcatError
from ccat.methods import Method, Outputs
from ccat.models import MultimodalModel
from ccat.ui import make_console

console = make_console()


@dataclass
class Predictions:
    """Per-sample outputs of a model on one split, in loader order (float32 arrays)."""

    keys: list[str]
    labels: np.ndarray  # (N,) int64
    fused: np.ndarray  # (N, C) fused logits
    unimodal: dict[str, np.ndarray]  # modality -> (N, C) logits
    embeddings: dict[str, np.ndarray]  # modality -> (N, D) pooled z^m
    representation: np.ndarray  # (N, R) the vector the fused prediction is read from
    contributions: dict[str, np.ndarray]  # modality -> (N,), summing to 1 over modalities


@torch.no_grad()
def predict(method: Method, model: MultimodalModel, dataset: BuiltDataset, split: str,
            ctx: distributed.Context, cfg: RunConfig, cache: DeviceCache | None = None,
            progress: bool = False) -> Predictions:
    """Every sample of ``split`` exactly once over the ``ctx.world`` ranks (one process
    predicting all of it when ``ctx`` says world 1); ``cfg`` is the run's config;
    ``progress`` shows a bar of this rank's samples."""
    model.eval()
    loader = make_loader(dataset, split, cfg.data, train=False, seed=0, rank=ctx.rank,
                         world=ctx.world, cache=cache)
    rows: dict[str, list] = {"keys": [], "labels": []}
    bar = Progress(TextColumn(split), BarColumn(), MofNCompleteColumn(), console=console,
                   transient=True, disable=not progress)
    with bar:
        task = bar.add_task(split, total=-(-dataset.num_samples(split) // ctx.world))
        for batch in loader:
            batch = batch.to(ctx.device)
            with distributed.autocast(ctx.device):
                out = method.predict(model, batch)
            for name, value in _arrays(out, method).items():
                rows.setdefault(name, []).append(value)
            rows["labels"].append(batch.label.cpu().numpy())
            rows["keys"] += batch.keys
            bar.update(task, advance=len(batch.keys))
    model.train()
    parts = distributed.gather(rows) if ctx.world > 1 else [rows]
    return _merge(parts, dataset, split, list(model.modalities))


def _arrays(out: Outputs, method: Method) -> dict[str, np.ndarray]:
    """One batch's outputs as float32 numpy arrays named as in the HDF5 layout; the
    contributions measured with the method's estimator."""
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


def _merge(parts: list[dict[str, list]], dataset: BuiltDataset, split: str,
           modalities: list[str]) -> Predictions:
    """The ranks' per-batch arrays, in rank order, checked against the manifest's count."""
    keys = [k for part in parts for k in part["keys"]]
    expected = dataset.num_samples(split)
    if len(keys) != expected or len(set(keys)) != expected:
        raise CcatError(f"{dataset.root} split {split!r} gave {len(keys)} samples "
                        f"({len(set(keys))} distinct) but its manifest lists {expected}; run "
                        f"`ccat-data verify {dataset.root}`")
    if not keys:
        raise CcatError(f"{dataset.root} split {split!r} has no samples to predict; rebuild "
                        f"the data with some")
    names = dict.fromkeys(name for part in parts for name in part if name != "keys")
    cat = {name: np.concatenate([a for part in parts for a in part.get(name, [])])
           for name in names}
    return Predictions(keys=keys, labels=cat["labels"], fused=cat["fused"],
                       unimodal={m: cat[f"logits/{m}"] for m in modalities},
                       embeddings={m: cat[f"embeddings/{m}"] for m in modalities},
                       representation=cat["representation"],
                       contributions={m: cat[f"contributions/{m}"] for m in modalities})
