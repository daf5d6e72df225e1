"""The training loop: stages, epochs, optimizers and schedules, precision, logging, checkpoints.

A run folder holds one run (see :mod:`ccat.run_dir` for its files and their write order):
training into a folder that holds one needs ``resume`` (continue, with the saved config:
any difference outside ``config.RESUME_FREE_KEYS`` is refused) or ``overwrite`` (start
afresh). ``best.pt`` follows ``RunConfig.select``: ``best`` is the best fused accuracy on
``RunConfig.select_split`` (by default the validation split, or the last epoch when the data
has none; never the test split unless named), a tie going to the later epoch; ``last`` is
the last epoch. :func:`selection_splits` is the one place that decides.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import random
import signal
import threading
import time
from collections import Counter, defaultdict
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from ccat.ui import make_console
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ccat import checkpoint, distributed, provenance, run_dir, tblog
from ccat.checkpoint import Checkpoint
from ccat.config import (ConfigError, OptimConfig, RunConfig, check_ranges, differences,
                         from_dict, save_config, to_dict)
from ccat.data import spec
from ccat.data.device_cache import DeviceCache
from ccat.data.pipeline import Batch, Extra, make_loader, num_train_batches
from ccat.data.reader import BuiltDataset, open_dataset
from ccat.errors import CcatError
from ccat.run_config import load_config, resolve_params
from ccat.evaluate import evaluate
from ccat.methods import METHODS, Method, RunData, Stage
from ccat.models import MultimodalModel
from ccat.step import NonFiniteLoss, Step

console = make_console()
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def param_groups(model: MultimodalModel, encoder_lr: dict[str, float]) -> list[dict[str, Any]]:
    """Trainable parameters, one group per modality named in ``encoder_lr`` at its own lr
    (e.g. BERT's), the rest at the optimizer's lr."""
    unknown = sorted(set(encoder_lr) - set(model.modalities))
    if unknown:
        raise ConfigError(f"optim.encoder_lr names {unknown}, not modalities of the data "
                          f"({model.modalities})")
    own = {id(p) for m in encoder_lr for p in model.encoder_parameters(m)}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in own]}]
    for m, lr in encoder_lr.items():
        groups.append({"params": [p for p in model.encoder_parameters(m) if p.requires_grad],
                       "lr": lr})
    return groups


def make_optimizer(model: MultimodalModel, cfg: RunConfig,
                   epochs: int | None = None) -> tuple[Optimizer, LRScheduler]:
    """The run's optimizer over the trainable parameters and its schedule, as ``cfg.optim``
    names them (``optim.name``, ``optim.schedule`` and their own settings), from
    torch.optim. The one builder of optimizers: every stage, and every method that trains
    with more than one optimizer (G-Blending's copies, through ``RunData.new_step``), gets
    its own from here. ``epochs``: the stage's, which a cosine schedule with ``t_max`` 0
    anneals over (default: ``optim.epochs``)."""
    o = from_dict({"optim": dataclasses.asdict(cfg.optim)}).optim  # resolved, cfg untouched
    opt = OPTIMIZERS[o.name](param_groups(model, o.encoder_lr), o)
    return opt, SCHEDULES[o.schedule](opt, o, epochs or o.epochs)


def _sgd(params: list[dict[str, Any]], o: OptimConfig) -> Optimizer:
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                           nesterov=o.nesterov)


def _adam(params: list[dict[str, Any]], o: OptimConfig) -> Optimizer:
    return torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                            weight_decay=o.weight_decay)


def _adamw(params: list[dict[str, Any]], o: OptimConfig) -> Optimizer:
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             weight_decay=o.weight_decay)


def _step(opt: Optimizer, o: OptimConfig, epochs: int) -> LRScheduler:
    return torch.optim.lr_scheduler.StepLR(opt, o.step_size, o.gamma)


def _cosine(opt: Optimizer, o: OptimConfig, epochs: int) -> LRScheduler:
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, o.t_max or epochs, o.eta_min)


def _constant(opt: Optimizer, o: OptimConfig, epochs: int) -> LRScheduler:
    return torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)  # lr as given


# optim.name and optim.schedule -> their torch.optim builders (config.OPTIMIZERS, SCHEDULES)
OPTIMIZERS = {"sgd": _sgd, "adam": _adam, "adamw": _adamw}
SCHEDULES = {"step": _step, "cosine": _cosine, "constant": _constant}


def fresh_step(model: MultimodalModel, cfg: RunConfig) -> Step:
    """A Step over ``model`` as the run's optimizer starts: at ``cfg``'s base lr with empty
    state (momentum, Adam's moments), and the run's clipping (a method's copy of the model
    trains with it)."""
    return Step(make_optimizer(model, cfg)[0], cfg.optim.grad_clip)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message names the stage, the epoch and what was saved.
    ``resumable``: ``--resume`` continues it; else (an ``--overwrite`` stopped before its
    first checkpoint, whose old run is back in place) the same command starts it again."""

    def __init__(self, where: str, resumable: bool = True):
        super().__init__(where)
        self.resumable = resumable


def open_run_data(cfg: RunConfig) -> BuiltDataset:
    """The run's shards, opened (manifest only)."""
    if not cfg.data.path:
        raise CcatError("no data given: pass --data PATH or set data.path in the config")
    return open_dataset(cfg.data.path, cfg.data.cache_dir or None)


def selection_splits(cfg: RunConfig, dataset: BuiltDataset) -> tuple[str | None, str | None]:
    """(the split evaluated after each epoch, the split whose best fused accuracy picks
    best.pt, None = the last epoch): ``select_split`` when given, else the validation split,
    else the last epoch, with the test split evaluated for the curves only. ``select: last``
    keeps the evaluated split and picks the last epoch."""
    splits = dataset.splits
    if cfg.select_split:
        if cfg.select_split not in splits:
            raise CcatError(f"select_split {cfg.select_split!r} is not a split of "
                            f"{dataset.root} (it has {splits}); name one of those")
        evaluated, scored = cfg.select_split, cfg.select_split
    elif cfg.data.val_split in splits:
        evaluated, scored = cfg.data.val_split, cfg.data.val_split
    else:
        evaluated, scored = ("test" if "test" in splits else None), None
    return evaluated, (scored if cfg.select == "best" else None)


def is_selected(score: float | None, best: float) -> bool:
    """Whether an epoch scoring ``score`` (None: no selection split) becomes best.pt over
    the best score so far: always without a score, and on a tie (the later epoch wins)."""
    return score is None or score >= best


def check_batch_size(cfg: RunConfig, dataset: BuiltDataset, world: int) -> None:
    """A batch larger than the train split would repeat samples within an epoch."""
    need, have = cfg.data.batch_size * world, dataset.num_samples("train")
    if need > have:
        ranks = f" x {world} ranks" if world > 1 else ""
        raise CcatError(f"data.batch_size {cfg.data.batch_size}{ranks} is larger than the "
                        f"train split of {dataset.root} ({have} samples); set "
                        f"data.batch_size to at most {have // world}")


def data_location(path: str) -> dict[str, str]:
    """The data as given and as an absolute path (URLs are absolute already)."""
    absolute = path if "://" in path else str(Path(path).expanduser().resolve())
    return {"given": path, "absolute": absolute}


class Run:
    """One training run's state: data, method, model, where it writes."""

    def __init__(self, cfg: RunConfig, ctx: distributed.Context):
        self.dataset: BuiltDataset = open_run_data(cfg)
        check_batch_size(cfg, self.dataset, ctx.world)
        self.cfg, self.ctx, self.out = cfg, ctx, Path(cfg.out)
        self.val_split, self.select_split = selection_splits(cfg, self.dataset)
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
        self.data = RunData(self.dataset, cfg.data, cfg.seed, ctx.device, ctx.rank, ctx.world,
                            self.cache, new_step=partial(fresh_step, cfg=cfg),
                            autocast=partial(distributed.autocast, ctx.device))
        make_optimizer(self.model, cfg)  # refuses a bad optim.encoder_lr before any write
        distributed.broadcast_model(self.model)
        self.replacing = False  # --overwrite: the old run is set aside until last.pt is written
        self.last_good: Path | None = None
        self.saved_at = ""  # "stage 'x', epoch n" of last.pt
        self.at: tuple[int, int] | None = None  # (stage index, 0-based epoch) in training
        self.steps = 0  # training batches so far, over all stages
        self.tb: Any = None  # the TensorBoard writer while train() runs (rank 0)
        self.history: list[dict[str, Any]] = []
        self.code = [provenance.training_code()]  # every code version that trained the run

    def selection(self) -> dict[str, Any]:
        """How best.pt is chosen, as the checkpoint and the eval JSON record it."""
        if self.select_split is None:
            return {"select": self.cfg.select, "split": None, "rule": "last epoch"}
        return {"select": self.cfg.select, "split": self.select_split,
                "rule": "best fused accuracy", "ties": "later epoch"}

    def checkpoint(self, opt: Optimizer, sched: LRScheduler, stage_index: int, epoch: int,
                   best: tuple[float, int], metrics: dict[str, Any] | None) -> Checkpoint:
        """Everything ``--resume`` and ``ccat eval`` need, plus the data fingerprint and
        location; ``best`` is the selection score and the epoch it was reached at."""
        return Checkpoint(
            model=self.model.state_dict(), optimizer=opt.state_dict(),
            scheduler=sched.state_dict(), rng=checkpoint.rng_state(),
            method_state=self.method.state_dict(),
            stage=self.method.stages()[stage_index].name, stage_index=stage_index,
            epoch=epoch, step=self.steps, best=best[0], best_epoch=best[1],
            selection=self.selection(), metrics=metrics or {},
            config=to_dict(self.cfg), data=data_location(self.cfg.data.path),
            fingerprint=self.dataset.fingerprint,
            fingerprint_params=spec.fingerprint_params(self.dataset.manifest),
            code=self.code, world=self.ctx.world)

    def put_back(self) -> bool:
        """Whether stopping now puts back the run that ``--overwrite`` is replacing (it has
        no checkpoint of its own yet)."""
        return self.replacing and self.last_good is None

    def where(self) -> str:
        """Where training is now and what is saved, for the interruption message."""
        stages = self.method.stages()
        saved = f"{self.last_good} ({self.saved_at})" if self.last_good else "none yet"
        if self.put_back():
            saved += ", so the run it was replacing is back in place"
        if self.at is None:
            return (f"training of {self.out} stopped before an epoch began; last "
                    f"checkpoint: {saved}")
        index, epoch = self.at
        return (f"training of {self.out} stopped in stage {stages[index].name!r} "
                f"({index + 1} of {len(stages)}), epoch {epoch + 1} of "
                f"{stages[index].epochs}; last checkpoint: {saved}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: RunConfig, resume: bool = False,
          overwrite: bool = False) -> list[dict[str, Any]]:
    """Train every stage of ``cfg.method`` into ``cfg.out``; returns one metrics row per
    epoch. ``resume`` continues the run there, ``overwrite`` replaces it. The folder is
    locked for the whole call (rank 0 holds the lock), and every check (options, config,
    device, data, model, method) passes before ``overwrite`` moves the old run aside."""
    cfg = from_dict(to_dict(cfg))
    resolve_params(cfg)  # the saved config records every param the run trains with
    check_ranges(cfg)
    if resume and overwrite:
        raise CcatError("--resume continues the run in --out and --overwrite replaces it; "
                        "pass one of them")
    ctx = distributed.setup(cfg.device)
    try:
        with run_dir.locked(Path(cfg.out), ctx.main) as notes:
            for note in notes:
                console.print(note)
            distributed.barrier()  # other ranks read the folder once rank 0 has put it right
            return _train_locked(cfg, ctx, resume, overwrite)
    finally:
        distributed.cleanup()


def _train_locked(cfg: RunConfig, ctx: distributed.Context, resume: bool,
                  overwrite: bool) -> list[dict[str, Any]]:
    """:func:`train` once the folder is this process's."""
    state = claim_folder(cfg, resume, overwrite)
    if state is not None and finished(cfg, state):
        return _report_finished(cfg, state, ctx.main)
    run = Run(cfg, ctx)  # opens the data and builds everything: the checks before any write
    if resume:
        with _writes_speak(run):
            _resume(run, state)
    run.replacing = overwrite and ctx.main
    with run_dir.replacing(run.out, run.replacing):
        if ctx.main:
            with _writes_speak(run):
                save_config(cfg, run.out / run_dir.CONFIG)
            console.print(f"best.pt: {_selection_text(run)}")
        with tblog.open_writer(run.out, ctx.main) as run.tb:  # OUT/tb/, rank 0 only
            _train_stages(run, state)
    if ctx.main:
        console.print(summary_table(run.history))
    return run.history


@contextlib.contextmanager
def _writes_speak(run: Run) -> Iterator[None]:
    """A run file that cannot be written (a full disk, a folder turned read-only) stops the
    run with one sentence naming the folder, what ``last.pt`` still holds and the fix."""
    try:
        yield
    except OSError as err:
        full = err.errno in DISK_FULL
        why = (f"the disk holding {run.out} is full ({err.strerror})" if full
               else f"cannot write into {run.out} ({err.strerror})")
        fix = "free space on it" if full else "make it writable"
        if run.put_back():
            then = f"the run it was replacing is back in place: {fix}, then run the command again"
        elif run.last_good:
            then = f"{run.last_good} still holds {run.saved_at}: {fix}, then continue with --resume"
        else:
            then = (f"no checkpoint was written yet: {fix}, then run the command again with "
                    f"--overwrite")
        raise CcatError(f"{why}; {then}") from None


def _train_stages(run: Run, state: Checkpoint | None) -> None:
    """Every stage from the checkpoint's on; Ctrl-C becomes :class:`Interrupted`."""
    try:
        for index, stage in enumerate(run.method.stages()):
            if state is not None and index < state.stage_index:
                continue
            resuming = state is not None and index == state.stage_index
            _train_stage(run, index, stage, state if resuming else None)
    except KeyboardInterrupt:
        raise Interrupted(run.where(), resumable=not run.put_back()) from None


def _selection_text(run: Run) -> str:
    if run.cfg.select == "last":
        return "the last epoch (select: last)"
    if run.select_split is None:
        return (f"the last epoch (the data has no {run.cfg.data.val_split!r} split; "
                f"--set select_split=test would select on test)")
    return f"the best fused accuracy on {run.select_split!r} (a tie: the later epoch)"


def claim_folder(cfg: RunConfig, resume: bool, overwrite: bool) -> Checkpoint | None:
    """Apply "a run folder holds one run": returns ``last.pt`` to resume from (None to
    start from the first epoch). Nothing is removed here: ``overwrite`` sets the old run
    aside only once every check has passed (see :func:`run_dir.replacing`)."""
    out = Path(cfg.out)
    if not resume:
        if run_dir.holds_run(out) and not overwrite:
            raise CcatError(f"{out} holds a run already; pass --resume to continue it, "
                            f"--overwrite to replace it, or another --out")
        return None
    if not run_dir.holds_run(out):
        raise CcatError(f"--resume found no run in {out}; start it without --resume")
    state, saved = saved_run(out)
    check_same_config(saved, cfg, out)
    if state is not None and state.version == 0 and cfg.data.device_cache:
        # Format 0 predates the one epoch partition (ccat.data.partition): its device cache
        # dealt other batches than the streamed loader, so no code now draws what it drew.
        raise CcatError(f"{out} was trained with data.device_cache by a ccat whose device "
                        f"cache drew other batches than today's (checkpoint format 0), so "
                        f"a resume would not equal the uninterrupted run; pass --overwrite "
                        f"to train it afresh")
    return state


OVERWRITE_FIX = ("rerun with the run's settings, or pass --overwrite to train it afresh with "
                 "the new ones (make: add --overwrite to ARGS)")


def saved_run(out: Path) -> tuple[Checkpoint | None, RunConfig]:
    """The run in ``out``: its ``last.pt`` (None before the first epoch ended) and its
    resolved config (the checkpoint's, else ``config.yaml``)."""
    last, saved_config = out / run_dir.LAST, out / run_dir.CONFIG
    state = checkpoint.load(last, checkpoint.RESUME_KEYS) if last.is_file() else None
    if state is None and not saved_config.is_file():
        raise CcatError(f"{out} has neither {run_dir.LAST} nor {run_dir.CONFIG}, so its "
                        f"settings are unknown; pass --overwrite to train it afresh")
    return state, (state.cfg if state else load_config(saved_config, (), None, None))


def check_same_config(saved: RunConfig, cfg: RunConfig, out: Path,
                      fix: str = OVERWRITE_FIX) -> None:
    """Refuse a resume whose config changes anything that changes results, naming each
    differing key with both values."""
    changed = differences(saved, cfg)
    if changed:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changed)
        raise CcatError(f"--resume of {out} would change its settings ({listed}); {fix}")


def _stage_rows(stages: list[Stage], state: Checkpoint) -> int:
    """Metrics rows written up to the checkpoint: one per epoch, across stages."""
    return sum(s.epochs for s in stages[:state.stage_index]) + state.epoch


def _stages(cfg: RunConfig) -> list[Stage]:
    return METHODS.get(cfg.method.name)(cfg.method, cfg.optim.epochs).stages()


def finished(cfg: RunConfig, state: Checkpoint) -> bool:
    """Whether ``state`` is the last epoch of the last stage."""
    stages = _stages(cfg)
    return state.stage_index == len(stages) - 1 and state.epoch == stages[-1].epochs


def restore_folder(out: Path, stages: list[Stage], state: Checkpoint | None,
                   main: bool) -> list[dict[str, Any]]:
    """Undo what a kill left ahead of ``last.pt`` (see :mod:`ccat.run_dir`): cut
    ``metrics.jsonl`` back to its epoch, and copy it to ``best.pt`` when its own epoch is the
    selected one and ``best.pt`` does not hold it yet. Returns the metrics rows up to it."""
    rows = 0 if state is None else _stage_rows(stages, state)
    if not main:
        return run_dir.read_metrics(out)[:rows]
    history = run_dir.cut_metrics(out, rows)
    if state is not None and state.best_epoch == state.epoch:
        run_dir.copy_if_differs(out / run_dir.LAST, out / run_dir.BEST)
    return history


def _report_finished(cfg: RunConfig, state: Checkpoint, main: bool) -> list[dict[str, Any]]:
    """A resumed run that has nothing left to train: check its data and files, say so."""
    out = Path(cfg.out)
    state.check_fingerprint(open_run_data(cfg), str(out / run_dir.LAST))
    history = restore_folder(out, _stages(cfg), state, main)
    if main:
        console.print(f"{out} finished already (stage {state.stage!r}, epoch "
                      f"{state.epoch}); nothing to train")
    return history


def _resume(run: Run, state: Checkpoint | None) -> None:
    """Check ``last.pt`` against the data, restore the folder to it, and say where
    training continues."""
    stages, last = run.method.stages(), run.out / run_dir.LAST
    if state is not None:
        state.check_fingerprint(run.dataset, str(last))
        check_world(state, run.ctx, last)
        run.last_good, run.steps = last, state.step
        run.code = list(dict.fromkeys([*state.code, *run.code]))
        run.saved_at = f"stage {state.stage!r}, epoch {state.epoch}"
    run.history = restore_folder(run.out, stages, state, run.ctx.main)
    if run.ctx.main:
        console.print(f"resuming {run.out}: {_resume_point(stages, state, run.saved_at, last)}")


def check_world(state: Checkpoint, ctx: distributed.Context, last: Path) -> None:
    """Refuse to resume on another number of processes than the run was trained on: each
    epoch's batches, their order and the step count depend on it. A checkpoint from before
    the number was recorded is resumed with a note (exact only on the same number)."""
    saved = state.world
    if saved is None:
        if ctx.main:
            console.print(f"note: {last} does not record how many processes trained it "
                          f"(written before ccat recorded it); the resume is exact only on "
                          f"as many as then ({ctx.world} now)")
        return
    if saved != ctx.world:
        raise CcatError(f"{last} was trained by {_processes(saved)} but this resume runs "
                        f"{_processes(ctx.world)}; resume it with {_launch(saved)}, since "
                        f"each epoch's batches depend on the number of processes")


def _processes(world: int) -> str:
    return f"{world} process{'es' if world != 1 else ''} (torchrun world size {world})"


def _launch(world: int) -> str:
    return "ccat train, without torchrun" if world == 1 else \
        f"torchrun and {world} processes in all (e.g. --nproc-per-node {world})"


def _resume_point(stages: list[Stage], state: Checkpoint | None, saved_at: str,
                  last: Path) -> str:
    """Where a resumed run continues: stage, epoch and step."""
    if state is None:
        return (f"no checkpoint yet, starting at stage {stages[0].name!r} (1 of "
                f"{len(stages)}), epoch 1, step 1")
    index, epoch = state.stage_index, state.epoch
    if epoch == stages[index].epochs:
        index, epoch = index + 1, 0
    return (f"from {last} ({saved_at}) at stage {stages[index].name!r} ({index + 1} of "
            f"{len(stages)}), epoch {epoch + 1} of {stages[index].epochs}, "
            f"step {state.step + 1}")


def _train_stage(run: Run, index: int, stage: Stage, state: Checkpoint | None) -> None:
    """Run one stage's epochs (from the checkpoint's epoch when resuming), calling the
    method's hooks in the order :class:`ccat.methods.base.Method` writes down."""
    run.method.begin_stage(stage, run.model)
    opt, sched = make_optimizer(run.model, run.cfg, stage.epochs)
    start, best = 0, (-1.0, 0)  # best.pt follows the selection of the last stage
    if state is not None:
        state.restore(run.model, opt, sched, run.method, run.out / run_dir.LAST)
        start, best = state.epoch, (state.best, state.best_epoch or 0)
    step = Step(opt, run.cfg.optim.grad_clip)
    for epoch in range(start, stage.epochs):
        run.at = (index, epoch)
        run.method.begin_epoch(epoch)
        row = _train_epoch(run, stage, epoch, step)
        sched.step()
        distributed.average_buffers(run.model)
        metrics = _evaluate_epoch(run, row)
        score = metrics["accuracy"]["fused"] if metrics and run.select_split else None
        best_now = is_selected(score, best[0])
        if best_now:
            best = (score if score is not None else best[0], epoch + 1)
        if run.ctx.main:
            _save(run, run.checkpoint(opt, sched, index, epoch + 1, best, metrics), best_now,
                  row)


def _evaluate_epoch(run: Run, row: dict[str, Any]) -> dict[str, Any] | None:
    """Metrics on the split evaluated each epoch, added to ``row`` (None without one)."""
    if run.val_split is None:
        return None
    metrics = evaluate(run.method, run.model, run.dataset, run.val_split, run.ctx, run.cfg,
                       run.cache)
    row.update({f"{run.val_split}/acc/{k}": v for k, v in metrics["accuracy"].items()})
    row.update({f"{run.val_split}/contrib/{k}": v for k, v in metrics["contribution"].items()})
    return metrics


def _save(run: Run, ckpt: Checkpoint, best_now: bool, row: dict[str, Any]) -> None:
    """Rank 0, in the order :mod:`ccat.run_dir` relies on: the metrics row, last.pt,
    then best.pt (a copy of last.pt); then the epoch's table."""
    run.history.append(row)
    last = run.out / run_dir.LAST
    with _writes_speak(run):
        run_dir.append_metrics(run.out, row)
        with _ctrl_c_waits():  # last.pt, and what the run knows of it, change together
            ckpt.save(last)
            run_dir.written(run_dir.LAST)
            if run.replacing:
                run_dir.discard_replaced(run.out)  # the new run has its first checkpoint
            run.last_good = last
            run.saved_at = f"stage {ckpt.stage!r}, epoch {ckpt.epoch}"
        if best_now:
            run_dir.copy_atomic(last, run.out / run_dir.BEST)
            run_dir.written(run_dir.BEST)
    tblog.log_epoch(run.tb, row, len(run.history), run.val_split or "")
    console.print(epoch_table(row))


@contextlib.contextmanager
def _ctrl_c_waits() -> Iterator[None]:
    """Ctrl-C during the block takes effect at its end, so that the interruption message
    (and ``--overwrite``'s putting back of the old run) sees the checkpoint written or not,
    never in between. Only the main thread can hold signals; elsewhere this is a no-op."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is None:  # a handler set outside Python: keep it
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _train_epoch(run: Run, stage: Stage, epoch: int, step: Step) -> dict[str, Any]:
    """One epoch of ``method.train_step``; returns the averaged step metrics."""
    ctx = run.ctx
    started = time.perf_counter()
    run.method.before_epoch(run.model, run.data)
    run.model.train()
    extras = run.method.epoch_extras()
    loader, total = _epoch_loader(run, epoch, extras or [])
    sums: dict[str, float] = defaultdict(float)
    seen, steps = 0, 0
    progress = Progress(TextColumn(f"{stage.name} {epoch + 1}/{stage.epochs}"), BarColumn(),
                        MofNCompleteColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[loss]}"), console=console, transient=True,
                        disable=not ctx.main)
    with progress:
        task = progress.add_task("train", total=total, loss="")
        for batch in loader:
            batch, steps = batch.to(ctx.device), steps + 1
            try:
                with distributed.autocast(ctx.device):
                    out = run.method.train_step(run.model, batch, step)
            except NonFiniteLoss:
                raise CcatError(f"non-finite loss in stage {stage.name!r}, epoch {epoch + 1}, "
                                f"step {steps}, batch keys {batch.keys}; last good checkpoint: "
                                f"{run.last_good or 'none yet'}") from None
            for k, v in out.items():
                sums[k] += v
            seen += len(batch.keys)
            run.steps += 1
            progress.update(task, advance=1, loss=" ".join(f"{k}={v:.3f}" for k, v in out.items()
                                                          if k.startswith("loss")))
    run.method.end_epoch()
    elapsed = time.perf_counter() - started
    row: dict[str, Any] = {"stage": stage.name, "epoch": epoch + 1,
                           "lr": step.optimizer.param_groups[0]["lr"]}
    if extras is not None:
        row.update(extra_counts(extras, run.model.modalities))
    row.update({k: v / max(1, steps) for k, v in sums.items()})
    row["samples_per_s"] = seen * ctx.world / elapsed
    # the epoch's training steps, loader and the method's own passes (before_epoch) included;
    # not its evaluation
    row["train_s"] = elapsed
    return row


def _epoch_loader(run: Run, epoch: int, extras: list[Extra]) -> tuple[Iterable[Batch], int]:
    """Epoch ``epoch``'s training batches for this rank (the split once plus the method's
    ``extras``) and how many there are."""
    cfg, ctx = run.cfg, run.ctx
    loader = make_loader(run.dataset, "train", cfg.data, train=True, seed=cfg.seed, epoch=epoch,
                         rank=ctx.rank, world=ctx.world, cache=run.cache, extras=extras)
    return loader, num_train_batches(run.dataset, cfg.data.batch_size, ctx.world, len(extras))


def extra_counts(extras: list[Extra], modalities: list[str]) -> dict[str, int]:
    """The epoch's extra entries per dropped modality, as its metrics row logs them."""
    dropped = Counter(e.drop for e in extras)
    return {f"extra/drop_{m}": dropped[m] for m in modalities}


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


# Wall-clock values of a metrics row: they differ between otherwise identical runs.
TIMING_KEYS = ("samples_per_s", "train_s")
SUMMARY_PREFIXES = ("stage", "epoch", "loss", "selected", *TIMING_KEYS)


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
