"""Evaluation: fused and per-modality accuracy, macro-F1, per-class accuracy, contributions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
from rich.table import Table

from ccat import checkpoint, distributed, outputs, run_dir
from ccat.config import RunConfig
from ccat.data.device_cache import DeviceCache
from ccat.data.reader import BuiltDataset
from ccat.methods import Method
from ccat.models import MultimodalModel
from ccat.predict import Predictions, predict
from ccat.ui import make_console

console = make_console()


def compute_metrics(pred: Predictions, split: str, classes: list[str]) -> dict[str, Any]:
    """The evaluation JSON: split, num_samples, accuracy, macro_f1, per-class, contribution."""
    label, fused = pred.labels, pred.fused.argmax(1)
    accuracy = {"fused": float((fused == label).mean())}
    accuracy.update({m: float((logits.argmax(1) == label).mean())
                     for m, logits in pred.unimodal.items()})
    f1s, per_class = [], {}
    for c, name in enumerate(classes):
        tp = float(((fused == c) & (label == c)).sum())
        support, predicted = float((label == c).sum()), float((fused == c).sum())
        f1s.append(2 * tp / (support + predicted) if support + predicted else 0.0)
        per_class[name] = tp / support if support else 0.0
    return {"split": split, "num_samples": int(len(label)), "accuracy": accuracy,
            "macro_f1": float(np.mean(f1s)), "per_class_accuracy": per_class,
            "contribution": {m: float(share.mean()) for m, share in pred.contributions.items()}}


def evaluate(method: Method, model: MultimodalModel, dataset: BuiltDataset, split: str,
             ctx: distributed.Context, cfg: RunConfig,
             cache: DeviceCache | None = None) -> dict[str, Any]:
    """Metrics of ``model`` on ``split`` (``cfg`` is the run's config)."""
    return compute_metrics(predict(method, model, dataset, split, ctx, cfg, cache), split,
                           dataset.classes)


def value_table(title: str, groups: list[tuple[str, dict[str, float]]]) -> Table:
    """A two-column metric/value table: each ``(prefix, {name: value})`` group in order."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for prefix, values in groups:
        for name, value in values.items():
            table.add_row(f"{prefix} {name}".strip(), f"{value:.4f}")
    return table


def metrics_table(metrics: dict[str, Any], title: str) -> Table:
    return value_table(title, [("accuracy", metrics["accuracy"]),
                               ("", {"macro-F1": metrics["macro_f1"]}),
                               ("class", metrics["per_class_accuracy"]),
                               ("contribution", metrics["contribution"]),
                               ("probe", metrics.get("probe", {}))])


# (the opened checkpoint, the split evaluated) -> the probe's result ("probe": accuracies)
Probe = Callable[[checkpoint.OpenCheckpoint, str], dict[str, Any]]


def evaluate_checkpoint(ckpt_path: str | Path, data: str | None = None, split: str = "test",
                        json_path: str | Path | None = None, probe: Probe | None = None,
                        device: str | None = None) -> dict[str, Any]:
    """``ccat eval``: evaluate a checkpoint on ``split`` of its data (or ``data``) on
    ``device`` (default: the run's); with ``probe`` (``ccat eval --probe`` passes
    :func:`ccat.analysis.probe.probe_checkpoint`), add its accuracies under ``probe``, from
    the same opened checkpoint (loaded once; the evaluated split predicted once when one
    process runs). The JSON goes to ``json_path``, checked before any work
    (:func:`ccat.outputs.check_output`)."""
    if json_path:
        json_path = outputs.check_output(json_path, "--json", [ckpt_path], [run_dir.EVAL])
    with checkpoint.open_checkpoint(ckpt_path, data, device, (split,)) as opened:
        ckpt, ctx = opened.ckpt, opened.ctx
        metrics = compute_metrics(opened.predict(split), split, opened.dataset.classes)
        metrics["run"] = run_dir.run_block(ckpt.cfg, opened.dataset.name)  # for `ccat report`
        metrics["selection"] = ckpt.selection_block()
        metrics["code"] = ckpt.code  # what trained it
        if probe is not None:
            metrics["probe"] = probe(opened, split)["probe"]
    if ctx.main:
        console.print(metrics_table(metrics, f"{ckpt_path} on {split}"))
        if json_path:
            outputs.write_text(json_path, json.dumps(metrics, indent=2) + "\n", "--json")
    return metrics
