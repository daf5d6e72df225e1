"""The training loop: stages, epochs, SGD + StepLR, precision, logging, checkpoints."""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ccat.ui import make_console
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ccat import checkpoint, distributed
from ccat.analysis import tblog
from ccat.config import ConfigError, RunConfig, save_config, to_dict
from ccat.data import spec
from ccat.data.device_cache import DeviceCache
from ccat.data.pipeline import make_loader, num_train_batches
from ccat.data.reader import BuiltDataset, DatasetError, open_dataset
from ccat.errors import CcatError
from ccat.evaluate import autocast, evaluate
from ccat.methods import METHODS, Method, Stage
from ccat.models import MultimodalModel
from ccat.step import NonFiniteLoss, Step

console = make_console()


def param_groups(model: MultimodalModel, encoder_lr: dict[str, float]) -> list[dict[str, Any]]:
    """Trainable parameters, one group per modality named in ``encoder_lr`` at its own lr
    (e.g. BERT's), the rest at the optimizer's lr."""
    unknown = sorted(set(encoder_lr) - set(model.modalities))
    if unknown:
        raise ConfigError(f"optim.encoder_lr names {unknown}, not modalities of the data "
                          f"({model.modalities})")
    own = {id(p) for m in encoder_lr for p in model.encoders[m].parameters()}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in own]}]
    for m, lr in encoder_lr.items():
        groups.append({"params": [p for p in model.encoders[m].parameters() if p.requires_grad],
                       "lr": lr})
    return groups


def make_optimizer(model: MultimodalModel, cfg: RunConfig) -> tuple[Optimizer, LRScheduler]:
    """SGD over the trainable parameters and StepLR (lr * gamma every step_size epochs)."""
    params = param_groups(model, cfg.optim.encoder_lr)
    opt = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                          weight_decay=cfg.optim.weight_decay)
    return opt, torch.optim.lr_scheduler.StepLR(opt, cfg.optim.step_size, cfg.optim.gamma)


class Run:
    """One training run's state: data, method, model, where it writes."""

    def __init__(self, cfg: RunConfig, ctx: distributed.Context):
        if not cfg.data.path:
            raise CcatError("no data given: pass --data PATH or set data.path in the config")
        try:
            self.dataset: BuiltDataset = open_dataset(cfg.data.path, cfg.data.cache_dir or None)
        except DatasetError as err:
            raise CcatError(str(err)) from None
        self.cfg, self.ctx, self.out = cfg, ctx, Path(cfg.out)
        self.val_split = cfg.data.val_split if cfg.data.val_split in self.dataset.splits else "test"
        seed_everything(cfg.seed)
        if ctx.device.type == "cpu":
            distributed.configure_cpu(cfg.deterministic, cfg.threads)
        self.method: Method = METHODS.get(cfg.method.name)(cfg.method, cfg.optim.epochs)
        self.method.bind_data(self.dataset.num_samples("train"),
                              num_train_batches(self.dataset, cfg.data.batch_size, ctx.world))
        self.model = self.method.build_model(self.dataset.modalities, len(self.dataset.classes),
                                             cfg.model).to(ctx.device)
        if ctx.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.compile:
            for encoder in self.model.encoders.values():  # in place: state_dict keys unchanged
                encoder.compile(backend=cfg.compile)
        self.cache = DeviceCache(self.dataset, cfg.data, ctx.device) if cfg.data.device_cache \
            else None
        distributed.broadcast_model(self.model)
        self.last_good: Path | None = None
        self.tb: Any = None  # the TensorBoard writer while train() runs (rank 0)
        self.history: list[dict[str, Any]] = []

    def checkpoint(self, opt: Optimizer, sched: LRScheduler, stage_index: int, epoch: int,
                   best: float, metrics: dict[str, Any]) -> dict[str, Any]:
        """Everything ``--resume`` and ``ccat eval`` need, plus the data fingerprint."""
        return {"model": self.model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": checkpoint.rng_state(),
                "method_state": self.method.state_dict(),
                "stage": self.method.stages()[stage_index].name, "stage_index": stage_index,
                "epoch": epoch, "best": best, "metrics": metrics, "config": to_dict(self.cfg),
                "fingerprint": self.dataset.fingerprint,
                "fingerprint_params": spec.fingerprint_params(self.dataset.manifest)}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: RunConfig, resume: bool = False) -> list[dict[str, Any]]:
    """Train every stage of ``cfg.method``; returns one metrics row per epoch."""
    ctx = distributed.setup(cfg.device)
    try:
        run = Run(cfg, ctx)
        state = _resume_state(run) if resume else None
        if ctx.main:
            run.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run.out / "config.yaml")
        with tblog.open_writer(run.out, ctx.main) as run.tb:  # OUT/tb/, rank 0 only
            for index, stage in enumerate(run.method.stages()):
                if state is not None and index < state["stage_index"]:
                    continue
                resuming = state is not None and index == state["stage_index"]
                _train_stage(run, index, stage, state if resuming else None)
        if ctx.main:
            console.print(summary_table(run.history))
        return run.history
    finally:
        distributed.cleanup()


def _resume_state(run: Run) -> dict[str, Any]:
    """``OUT/last.pt``, checked against the data, and the metrics logged so far."""
    path = run.out / "last.pt"
    if not path.is_file():
        raise CcatError(f"--resume found no {path}; start the run without --resume")
    state = checkpoint.load(path)
    checkpoint.check_fingerprint(state, run.dataset, str(path))
    run.last_good = path
    jsonl = run.out / "metrics.jsonl"
    if jsonl.is_file():
        run.history = [json.loads(line) for line in jsonl.read_text().splitlines() if line]
    return state


def _train_stage(run: Run, index: int, stage: Stage, state: dict[str, Any] | None) -> None:
    """Run one stage's epochs (from the checkpoint's epoch when resuming)."""
    run.method.begin_stage(stage, run.model)
    opt, sched = make_optimizer(run.model, run.cfg)
    start, best = 0, -1.0  # best.pt follows the best validation accuracy of the last stage
    if state is not None:
        run.model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        run.method.load_state_dict(state.get("method_state", {}))
        start, best = state["epoch"], state["best"]
    step = Step(opt, run.cfg.optim.grad_clip)
    for epoch in range(start, stage.epochs):
        run.method.begin_epoch(epoch)
        row = _train_epoch(run, stage, epoch, step)
        sched.step()
        distributed.average_buffers(run.model)
        metrics = evaluate(run.method, run.model, run.dataset, run.val_split, run.ctx, run.cfg,
                           run.cache)
        row.update({f"{run.val_split}/acc/{k}": v for k, v in metrics["accuracy"].items()})
        row.update({f"{run.val_split}/contrib/{k}": v for k, v in metrics["contribution"].items()})
        best_now = metrics["accuracy"]["fused"] > best
        best = max(best, metrics["accuracy"]["fused"])
        if run.ctx.main:
            _save(run, opt, sched, index, epoch + 1, best, metrics, best_now, row)


def _save(run: Run, opt: Optimizer, sched: LRScheduler, index: int, epoch: int, best: float,
          metrics: dict[str, Any], best_now: bool, row: dict[str, Any]) -> None:
    """Rank 0: last.pt (and best.pt), metrics.jsonl, the epoch's table."""
    ckpt = run.checkpoint(opt, sched, index, epoch, best, metrics)
    checkpoint.save_atomic(ckpt, run.out / "last.pt")
    if best_now:
        checkpoint.save_atomic(ckpt, run.out / "best.pt")
    run.last_good = run.out / "last.pt"
    run.history.append(row)
    with open(run.out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    tblog.log_epoch(run.tb, row, len(run.history), run.val_split)
    console.print(epoch_table(row))


def _train_epoch(run: Run, stage: Stage, epoch: int, step: Step) -> dict[str, Any]:
    """One epoch of ``method.train_step``; returns the averaged step metrics."""
    cfg, ctx = run.cfg, run.ctx
    loader = make_loader(run.dataset, "train", cfg.data, train=True, seed=cfg.seed, epoch=epoch,
                         rank=ctx.rank, world=ctx.world, cache=run.cache)
    total = num_train_batches(run.dataset, cfg.data.batch_size, ctx.world)
    sums: dict[str, float] = defaultdict(float)
    seen, steps, started = 0, 0, time.perf_counter()
    progress = Progress(TextColumn(f"{stage.name} {epoch + 1}/{stage.epochs}"), BarColumn(),
                        MofNCompleteColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[loss]}"), console=console, transient=True,
                        disable=not ctx.main)
    with progress:
        task = progress.add_task("train", total=total, loss="")
        for batch in loader:
            batch, steps = batch.to(ctx.device), steps + 1
            try:
                with autocast(ctx.device):
                    out = run.method.train_step(run.model, batch, step)
            except NonFiniteLoss:
                raise CcatError(f"non-finite loss in stage {stage.name!r}, epoch {epoch + 1}, "
                                f"step {steps}, batch keys {batch.keys}; last good checkpoint: "
                                f"{run.last_good or 'none yet'}") from None
            for k, v in out.items():
                sums[k] += v
            seen += len(batch.keys)
            progress.update(task, advance=1, loss=" ".join(f"{k}={v:.3f}" for k, v in out.items()
                                                          if k.startswith("loss")))
    elapsed = time.perf_counter() - started
    row: dict[str, Any] = {"stage": stage.name, "epoch": epoch + 1,
                           "lr": step.optimizer.param_groups[0]["lr"]}
    row.update({k: v / max(1, steps) for k, v in sums.items()})
    row["samples_per_s"] = seen * ctx.world / elapsed
    return row


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def epoch_table(row: dict[str, Any]) -> Table:
    """The epoch's numbers as a grid of ``name value`` pairs, four pairs a line."""
    table = Table.grid(padding=(0, 1))
    pairs = list(row.items())
    for _ in range(4):
        table.add_column(style="dim")
        table.add_column(justify="right")
    for start in range(0, len(pairs), 4):
        cells = [c for k, v in pairs[start:start + 4] for c in (k, _fmt(v))]
        table.add_row(*cells)
    return table


SUMMARY_PREFIXES = ("stage", "epoch", "loss", "selected", "samples_per_s")


def summary_table(history: list[dict[str, Any]]) -> Table:
    """All epochs of the run, one row each: losses, validation accuracy, selection."""
    keys = [k for k in dict.fromkeys(k for row in history for k in row)
            if k.startswith(SUMMARY_PREFIXES) or "/acc/" in k]
    table = Table(title="training summary")
    for key in keys:
        table.add_column(key.replace("/acc/", " acc ").replace("selected/", "sel ")
                         .replace("samples_per_s", "samples/s"), justify="right")
    for row in history:
        table.add_row(*(_fmt(row.get(k, "")) for k in keys))
    return table
