"""The interface every training method implements, and its registry.

The loop owns epochs, schedules, precision, devices, logging and checkpoints; a method
owns its stages and what happens inside one step. :class:`Method`'s docstring is the one
place the order of its hooks is written down.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterator

import torch

from ccat.config import ConfigError, DataConfig, MethodConfig, ModelConfig, parse_params
from ccat.contribution import Estimator
from ccat.data.pipeline import Batch, Extra, make_loader
from ccat.data.reader import BuiltDataset
from ccat.models import MultimodalModel, build_model
from ccat.models.fusion import Features
from ccat.registry import Registry, subclasses_of
from ccat.step import Step


@dataclass(frozen=True)
class Stage:
    """A named phase of training with its own optimizer and schedule.

    ``name`` is the plain string that checkpoints, metrics rows and messages show. A method
    with several stages names them by an :class:`~enum.Enum` of its own (:meth:`of`) and
    branches on ``self.stage.kind is ITS_ENUM.X``: a misspelt stage is then an error where
    it is written, not a branch that never runs."""

    name: str
    epochs: int
    kind: Enum | None = None  # the typed name, for a method that branches on its stage

    @classmethod
    def of(cls, kind: Enum, epochs: int) -> Stage:
        """The stage named by ``kind`` (its value is the name), ``epochs`` long."""
        return cls(str(kind.value), epochs, kind)


@dataclass
class Outputs:
    """What a method predicts for a batch: fused logits and each modality's logits, with
    the vectors they come from for analysis and export."""

    fused: torch.Tensor
    unimodal: dict[str, torch.Tensor]
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # pooled z^m (B, D)
    # The vector the fused prediction is read from: the fused feature f for feature-level
    # fusion, the concatenated z^m for decision-level fusion.
    representation: torch.Tensor | None = None


def fuse_decisions(unimodal: dict[str, torch.Tensor], rule: str = "mean") -> torch.Tensor:
    """Decision-level fusion of unimodal logits (CCAT inference)."""
    stacked = torch.stack(list(unimodal.values()))
    if rule == "mean":
        return stacked.mean(0)
    if rule == "sum":
        return stacked.sum(0)
    raise ValueError(f"method.params.fusion_rule must be 'mean' or 'sum', not {rule!r}")


def predict_outputs(model: MultimodalModel, feats: Features,
                    unimodal: dict[str, torch.Tensor] | Callable[[str, torch.Tensor], torch.Tensor],
                    decide: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None
                    ) -> Outputs:
    """A method's :class:`Outputs` for a batch's ``feats``: ``unimodal`` (the logits, or a
    head scoring modality m's pooled z^m), and the fused logits: ``decide(unimodal)`` at
    decision level (its representation: the z^m concatenated), else feature level
    Cls(f) with f = model.fusion(feats) (its representation: f)."""
    embeddings = {m: feats[m].pooled for m in model.modalities}
    if callable(unimodal):
        unimodal = {m: unimodal(m, z) for m, z in embeddings.items()}
    if decide is not None:
        return Outputs(fused=decide(unimodal), unimodal=unimodal, embeddings=embeddings,
                       representation=torch.cat(list(embeddings.values()), 1))
    fused = model.fusion(feats)
    return Outputs(fused=model.classifier(fused), unimodal=unimodal, embeddings=embeddings,
                   representation=fused)


@dataclass
class RunData:
    """The run's data, for a method that needs passes of its own beyond the loop's
    training steps (a held-out estimate, a clustering of features, a valuation pass).

    ``batches`` is this rank's share: under torchrun a method that needs the whole split
    gathers or all-reduces what it computes (and says so)."""

    dataset: BuiltDataset
    cfg: DataConfig
    seed: int  # the run's seed: a training pass with it and an epoch streams what the loop does
    device: torch.device
    rank: int = 0
    world: int = 1
    cache: Any = None  # the run's DeviceCache, when it keeps the data on the GPU
    # For a method that needs an optimizer beside the loop's (G-Blending's copy of the model,
    # a second step): a fresh Step over a model's parameters, built by ccat.train's
    # make_optimizer (the one builder) from the run's optim section: its optim.name and
    # settings at the base lr, empty state (momentum, Adam's moments), its clipping; the
    # loop's schedule does not step it. And the precision the loop trains in.
    new_step: Callable[[MultimodalModel], Step] | None = None
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def batches(self, split: str, *, train: bool, epoch: int = 0) -> Iterator[Batch]:
        """``split``'s batches on the device: ``train=True`` as the loop's training epoch
        ``epoch`` streams them (shuffled by seed and epoch, augmented, full batches only),
        ``train=False`` as evaluation does (in order, no augmentation, every sample once
        over the ranks)."""
        loader = make_loader(self.dataset, split, self.cfg, train=train, seed=self.seed,
                             epoch=epoch, rank=self.rank, world=self.world, cache=self.cache)
        for batch in loader:
            yield batch.to(self.device)


class WindowEnd(Enum):
    """How a method's ``modulation_ends`` bounds its window of 0-based epochs within the
    stage (``modulation_starts`` is always the first epoch in it). The releases write the
    window ``starts <= epoch <= ends``, but count epochs from 0 or from 1, so the same check
    names two windows on ccat's 0-based epochs:

    - ``INCLUDED``: [starts, ends], ``ends`` the last epoch in the window; the releases'
      check on 0-based epochs. PMR (main_Prototype_grad.py:156, epochs from 0 at :541),
      UMT, AMCo, MBSD and CML (BalanceBenchmark's trainers, ``current_epoch`` from 0).
    - ``EXCLUDED``: [starts, ends), ``ends`` the first epoch out of it; the releases' check
      on 1-based epochs. AGM (run/CREMAD_main.py:159, epochs from 1 at :611-635; its
      ``starts`` is read 0-based, so one above 0 begins an epoch later than released), and
      OGM-GE, whose release counts from 0 (main.py:132, :275) and so also modulates epoch
      ``ends``: ccat's OGM-GE departs from it by that one epoch (its ``variant:
      released`` reads ``ends`` as INCLUDED, the release's window).
    """

    INCLUDED = "included"
    EXCLUDED = "excluded"


def in_window(epoch: int, starts: int, ends: int, end: WindowEnd) -> bool:
    """Whether 0-based ``epoch`` lies in the modulation window from ``starts`` to ``ends``,
    ``ends`` itself in it or not as ``end`` says (:class:`WindowEnd`)."""
    if end is WindowEnd.INCLUDED:
        return starts <= epoch <= ends
    return starts <= epoch < ends


def require_two_modalities(method: str, modalities: dict[str, Any] | list[str],
                           why: str) -> None:
    """Refuse data without exactly two modalities, in one sentence saying ``why``."""
    if len(modalities) != 2:
        raise ConfigError(f"method {method!r} needs exactly two modalities ({why}); the data "
                          f"has {len(modalities)}: {', '.join(modalities)}")


def split_budget(epochs: int, budget: str, first: int, fraction: float, method: str,
                 first_key: str) -> tuple[int, int]:
    """Epochs of a two-stage method's stages for ``optim.epochs`` = ``epochs``.

    Budget "total" (the default of CCAT and UMT): the stages share ``epochs``, the first
    taking ``first`` (its ``method.params.<first_key>``) or ``round(fraction * epochs)``.
    Budget "per_stage": each stage gets ``epochs`` (the first ``first`` if set)."""
    if budget == "per_stage":
        return first or epochs, epochs
    first = first or round(fraction * epochs)
    if not 1 <= first < epochs:
        raise ConfigError(
            f"optim.epochs={epochs} is {method}'s total budget for both stages "
            f"(method.params.budget=total) and stage 1 would get {first} of them; give "
            f"optim.epochs >= 2 with method.params.{first_key} below it, or set "
            f"method.params.budget=per_stage")
    return first, epochs - first


class Method:
    """Base class: one stage, no model changes between stages.

    A method with hyperparameters of its own declares them as a ``Params`` dataclass with
    its paper's defaults; a config sets them under ``method.params``.

    The loop (:mod:`ccat.train`) calls the hooks in this order::

        stages()                                  when the method is built
        bind_data(train_samples, batches_per_epoch)
        for each stage, from the checkpoint's on a resume:
            begin_stage(stage, model)             sets self.stage, then on_stage(stage, model)
            load_state_dict(state)                on a resume, in the checkpoint's stage
            for each epoch, 0-based within the stage, from the checkpoint's on a resume:
                begin_epoch(epoch)                sets self.epoch, then on_epoch(epoch)
                before_epoch(model, data)         passes of the method's own over the data
                epoch_extras()                    entries added to this epoch's pass
                train_step(model, batch, step)    for each training batch
                end_epoch()                       after the epoch's last train_step
                predict(model, batch)             the epoch's evaluation (a run with one)
                state_dict()                      into the epoch's checkpoint (rank 0)

    ``ccat eval``, probe and export call ``begin_stage`` with the checkpoint's stage, then
    ``load_state_dict``, then ``predict``. ``self.stage`` and ``self.epoch`` are the loop's:
    a method reads them and never sets them, and it extends ``on_stage`` and ``on_epoch``,
    not ``begin_stage`` and ``begin_epoch`` (a subclass overriding those is refused).
    """

    fusion = "sum"
    Params: type | None = None
    estimator = Estimator()  # how evaluation measures this method's contributions

    def __init__(self, cfg: MethodConfig, epochs: int):
        self.cfg = cfg
        self.epochs = epochs
        self.params = parse_params(self.Params, cfg.params, cfg.name)
        self.epoch = 0
        self.stage: Stage = self.stages()[0]
        self.train_samples = 0  # the training split's size; 0 = not told (bind_data)
        self.batches_per_epoch = 0  # batches each rank trains per epoch; 0 = not told

    def bind_data(self, train_samples: int, batches_per_epoch: int) -> None:
        """Told by the loop before training: the training split's size and the batches
        each rank trains per epoch without extra entries (QMF's history, MLA's released
        annealing)."""
        self.train_samples, self.batches_per_epoch = train_samples, batches_per_epoch

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int,
                    cfg: ModelConfig) -> MultimodalModel:
        return build_model(modalities, num_classes, cfg, self.fusion)

    def stages(self) -> list[Stage]:
        return [Stage("joint", self.epochs)]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for owned, (sets, hook) in LOOP_OWNED.items():
            if owned in vars(cls):
                raise TypeError(f"method class {cls.__qualname__} overrides {owned}(), which "
                                f"the loop owns (it sets self.{sets}); override {hook}() "
                                f"instead")

    def begin_stage(self, stage: Stage, model: MultimodalModel) -> None:
        """The loop's entry into ``stage`` (also on resume and when a checkpoint is
        evaluated): ``self.stage`` becomes it, then :meth:`on_stage` runs."""
        self.stage = stage
        self.on_stage(stage, model)

    def on_stage(self, stage: Stage, model: MultimodalModel) -> None:
        """Prepare ``model`` for ``stage`` (freeze, re-initialize); ``self.stage`` is it."""

    def begin_epoch(self, epoch: int) -> None:
        """The loop's entry into training epoch ``epoch`` (0-based within the stage):
        ``self.epoch`` becomes it, then :meth:`on_epoch` runs."""
        self.epoch = epoch
        self.on_epoch(epoch)

    def on_epoch(self, epoch: int) -> None:
        """Reset what a method counts per epoch; ``self.epoch`` is ``epoch`` already. Runs
        before :meth:`before_epoch`, and on a resume after :meth:`load_state_dict`."""

    def end_epoch(self) -> None:
        """Called after the epoch's last :meth:`train_step`, before its evaluation (on
        every rank), for what a method reports or closes once per epoch."""

    def before_epoch(self, model: MultimodalModel, data: RunData) -> None:
        """Called at the start of each training epoch, after :meth:`begin_epoch` (and so
        after a resume's restore), with the run's data, for passes of the method's own;
        its time counts in the epoch's ``train_s``. The loop puts ``model`` back in train
        mode afterwards. What it computes from the model and the data it may recompute on
        resume, since the model, the RNG state and the data are those of the checkpoint."""

    def epoch_extras(self) -> list[Extra] | None:
        """Read by the loop after :meth:`before_epoch`: entries to add to this epoch's pass
        over the training split, each a sample once more with one modality left out (its
        batches carry ``Batch.drop``; see :mod:`ccat.data.pipeline`). The list must be the
        same on every rank. None (the default): the epoch is the split once, and its
        metrics row logs no ``extra/`` counts; a list, even empty: it logs them."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """State a method keeps across steps (e.g. loss histories), saved in checkpoints;
        tensors, numbers, strings, lists and dicts only (``weights_only`` loading)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` on ``--resume``, and when a checkpoint is evaluated
        (``ccat eval``, probe, export), before any :meth:`predict`."""

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        raise NotImplementedError

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        raise NotImplementedError


# The loop's entry points a method must not override: what each sets, and the hook a method
# extends in its place.
LOOP_OWNED = {"begin_stage": ("stage", "on_stage"), "begin_epoch": ("epoch", "on_epoch")}

METHODS: Registry[type[Method]] = Registry("method", "ccat.methods", subclasses_of(Method))
