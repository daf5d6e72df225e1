"""The interface every training method implements, and its registry.

The loop owns epochs, schedules, precision, devices, logging and checkpoints; a method
owns its stages and what happens inside one step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
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
    """A named phase of training with its own optimizer and schedule."""

    name: str
    epochs: int


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
        annealing, CCAT's end-of-epoch check)."""
        self.train_samples, self.batches_per_epoch = train_samples, batches_per_epoch

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int,
                    cfg: ModelConfig) -> MultimodalModel:
        return build_model(modalities, num_classes, cfg, self.fusion)

    def stages(self) -> list[Stage]:
        return [Stage("joint", self.epochs)]

    def begin_stage(self, stage: Stage, model: MultimodalModel) -> None:
        """Prepare ``model`` for ``stage`` (freeze, re-initialize); also called on resume."""
        self.stage = stage

    def begin_epoch(self, epoch: int) -> None:
        """Called before each training epoch (0-based within the stage)."""
        self.epoch = epoch

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


METHODS: Registry[type[Method]] = Registry("method", "ccat.methods", subclasses_of(Method))
