"""Per-sample outputs of a checkpoint on a split, written to HDF5 (layout in docs/evaluation.md).

    keys                  (N,)   UTF-8 strings, the samples' keys in loader order
    labels                (N,)   int64 class indices
    logits/fused          (N, C) float32 fused logits
    logits/<modality>     (N, C) float32 unimodal logits
    embeddings/<modality> (N, D) float32 pooled z^m
    representation        (N, R) float32 the vector the fused prediction is read from
    contributions/<m>     (N,)   float32 Eq. 5-6, summing to 1 over modalities
    attrs: classes, modalities, method, stage, checkpoint, fingerprint, split, ccat_version
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from rich.table import Table

from ccat import __version__, outputs
from ccat.analysis.collect import Collected, collect
from ccat.ui import make_console

console = make_console()


def write_h5(got: Collected, path: Path) -> Path:
    """Write ``got`` to ``path`` atomically: the file is built in memory (HDF5's core
    driver), so that a disk that fills up fails the plain write of its bytes, which
    :func:`ccat.outputs.output_file` words and cleans up, and never a half-written HDF5."""
    with h5py.File(path.name, "w", driver="core", backing_store=False) as f:
        f.create_dataset("keys", data=np.array(got.keys, dtype=object),
                         dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("labels", data=got.labels.astype(np.int64))
        f.create_dataset("logits/fused", data=got.fused)
        f.create_dataset("representation", data=got.representation)
        for m in got.modalities:
            f.create_dataset(f"logits/{m}", data=got.unimodal[m])
            f.create_dataset(f"embeddings/{m}", data=got.embeddings[m])
            f.create_dataset(f"contributions/{m}", data=got.contributions[m])
        f.attrs.update({"classes": got.classes, "modalities": got.modalities,
                        "method": got.method, "stage": got.stage, "checkpoint": got.checkpoint,
                        "fingerprint": got.fingerprint, "split": got.split,
                        "ccat_version": __version__})
        f.flush()
        image = f.id.get_file_image()
    with outputs.output_file(path, "--out") as out:
        out.write(image)
    return path


def export(ckpt: str | Path, out: str | Path, data: str | None = None, split: str = "test",
           device: str | None = None) -> Collected:
    """``ccat export``: run ``ckpt`` over ``split`` (on ``device``, default the run's) and
    write everything to ``out``, checked before any work (:func:`ccat.outputs.check_output`)."""
    out = outputs.check_output(out, "--out", [ckpt])
    got = collect(ckpt, data, split, device)
    write_h5(got, out)
    accuracy = float((got.fused.argmax(1) == got.labels).mean())
    console.print(export_table(got))
    console.print(f"wrote {out}: {len(got.keys)} samples of {split!r} from {ckpt}, "
                  f"fused accuracy {accuracy:.4f}")
    return got


def export_table(got: Collected) -> Table:
    """The HDF5 datasets written and their shapes."""
    table = Table(title="HDF5 datasets")
    table.add_column("dataset")
    table.add_column("shape", justify="right")
    shapes = {"keys": (len(got.keys),), "labels": got.labels.shape, "logits/fused": got.fused.shape,
              "representation": got.representation.shape}
    for m in got.modalities:
        shapes.update({f"logits/{m}": got.unimodal[m].shape,
                       f"embeddings/{m}": got.embeddings[m].shape,
                       f"contributions/{m}": got.contributions[m].shape})
    for name, shape in shapes.items():
        table.add_row(name, " x ".join(map(str, shape)))
    return table
