"""Evaluation: fused and per-modality accuracy, macro-F1, per-class accuracy, contributions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.table import Table

from ccat import checkpoint, distributed, outputs, provenance, run_dir
from ccat.config import RunConfig, from_dict
from ccat.data.device_cache import DeviceCache
from ccat.data.reader import BuiltDataset, open_dataset
from ccat.data.spec import MANIFEST_NAME
from ccat.errors import CcatError, UserError
from ccat.methods import METHODS, Method
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


def load_for_eval(ckpt: dict[str, Any], dataset: BuiltDataset, device: torch.device,
                  path: str | Path = "the checkpoint") -> tuple[Method, MultimodalModel]:
    """Rebuild the checkpoint's method and model (``path``: where it was read from), in the
    stage it was saved in, with the method's state (what its predict may read: ensemble
    weights, prototypes); a config that no longer builds them is one sentence naming it."""
    cfg = from_dict(ckpt["config"])
    try:
        method = METHODS.get(cfg.method.name)(cfg.method, cfg.optim.epochs)
        model = method.build_model(dataset.modalities, len(dataset.classes), cfg.model)
        stages = method.stages()
    except UserError as err:
        raise CcatError(f"the config saved in {path} does not build a model here ({err}); "
                        f"{checkpoint.CHECKPOINT_FIX}") from None
    if not 0 <= ckpt["stage_index"] < len(stages):
        raise CcatError(f"{path} says it was saved in stage {ckpt['stage_index']} of a method "
                        f"with {len(stages)}; {checkpoint.CHECKPOINT_FIX}")
    method.begin_stage(stages[ckpt["stage_index"]], model)
    checkpoint.load_state(model, ckpt["model"], Path(path), "model")
    checkpoint.load_state(method, ckpt.get("method_state", {}), Path(path), "method state")
    return method, model.to(device)


def run_data_path(ckpt: dict[str, Any]) -> str:
    """Where the checkpoint's run found its data: the absolute path it recorded, else the
    path as given (relative to where this runs), else a CcatError saying to pass --data."""
    given = from_dict(ckpt["config"]).data.path
    location = {"given": given, "absolute": given, **ckpt.get("data", {})}
    candidates = list(dict.fromkeys(str(location[k]) for k in ("absolute", "given")))
    for path in candidates:
        if "://" in path or (Path(path) / MANIFEST_NAME).is_file():
            return path
    raise CcatError(f"the run's data is neither at {location['absolute']} nor at "
                    f"{location['given']!r} from {Path.cwd()}; pass --data DIR (the shards "
                    f"it was trained on)")


def checkpoint_dataset(ckpt: dict[str, Any], ckpt_path: str | Path, data: str | None,
                       split: str) -> BuiltDataset:
    """The checkpoint's dataset (or ``data``), fingerprint-checked, with ``split`` present."""
    cfg = from_dict(ckpt["config"])
    dataset = open_dataset(data or run_data_path(ckpt), cfg.data.cache_dir or None)
    checkpoint.check_fingerprint(ckpt, dataset, str(ckpt_path))
    if split not in dataset.splits:
        raise CcatError(f"{dataset.root} has no split {split!r}; choose one of {dataset.splits}")
    return dataset


def checkpoint_selection(ckpt: dict[str, Any]) -> dict[str, Any]:
    """How the run chose this checkpoint (split or last epoch) and where it is in the run."""
    chosen = ckpt.get("selection", {"split": None, "rule": "unrecorded (an older checkpoint)"})
    return {**chosen, "stage": ckpt["stage"], "epoch": ckpt["epoch"]}


# (checkpoint, data, split, device) -> result
Probe = Callable[[Path, str | None, str, str | None], dict[str, Any]]
DEVICE_FIX = "pass --device cpu to run it on the CPU"  # how eval, probe, export, analyze say it


def evaluate_checkpoint(ckpt_path: str | Path, data: str | None = None, split: str = "test",
                        json_path: str | Path | None = None, probe: Probe | None = None,
                        device: str | None = None) -> dict[str, Any]:
    """``ccat eval``: evaluate a checkpoint on ``split`` of its data (or ``data``) on
    ``device`` (default: the run's); with ``probe`` (``ccat eval --probe`` passes
    :func:`ccat.analysis.probe.linear_probe`), add its accuracies under ``probe``. The JSON
    goes to ``json_path``, checked before any work (:func:`ccat.outputs.check_output`)."""
    if json_path:
        json_path = outputs.check_output(json_path, "--json", [ckpt_path], [run_dir.EVAL])
    ckpt = checkpoint.load(ckpt_path)
    cfg = from_dict(ckpt["config"])
    dataset = checkpoint_dataset(ckpt, ckpt_path, data, split)
    ctx = distributed.setup(device or cfg.device, DEVICE_FIX)
    if ctx.device.type == "cpu":
        distributed.configure_cpu(cfg.deterministic, cfg.threads)
    try:
        method, model = load_for_eval(ckpt, dataset, ctx.device, ckpt_path)
        metrics = evaluate(method, model, dataset, split, ctx, cfg)
        metrics["run"] = run_dir.run_block(cfg, dataset.name)  # who this is, for `ccat report`
        metrics["selection"] = checkpoint_selection(ckpt)
        metrics["code"] = ckpt.get("code", [provenance.UNRECORDED])  # what trained it
    finally:
        distributed.cleanup()
    if probe is not None:
        metrics["probe"] = probe(Path(ckpt_path), data, split, device)["probe"]
    if ctx.main:
        console.print(metrics_table(metrics, f"{ckpt_path} on {split}"))
        if json_path:
            outputs.write_text(json_path, json.dumps(metrics, indent=2) + "\n", "--json")
    return metrics
