"""UMT (Du et al., ICML 2023, "On Uni-Modal Feature Learning in Supervised Multi-Modal
Learning"): Uni-Modal Teacher.

Stage 1 ("teachers") trains one uni-modal model per modality, each an encoder and a linear
head of its own on its own CE: exactly the ``unimodal`` method (the paper's Uni-Modal
Ensemble, UME), run on ``model.teachers``. Stage 2 ("distill") trains a fresh concat-fusion
model, the student, on

    L = CE(W [z^1; ...; z^M] + b, y) + scaling * sum_m MSE(z^m, t^m)

where z^m is the student's pooled feature of modality m, t^m the frozen teacher's pooled
feature of the same input (no gradient) and MSE the mean over batch and feature elements,
while the distillation stage's epoch lies in [modulation_starts, modulation_ends].

Matched to the released code we could find, GeWu-Lab/BalanceBenchmark at 4c1482f:
``balancemm/trainer/UMT_trainer.py`` ``training_step`` (lines 129-147: CE of the fused
output, then per modality ``loss += scaling * MSE(teacher.encoder_result[m],
model.encoder_result[m])`` inside ``modulation_starts <= epoch <= modulation_ends``, the
teacher forwarded under ``torch.no_grad()``), its ``__init__`` (lines 26-53: one
single-modality ``BaseClassifier`` per modality, trained beforehand by
``unimodal_trainer.py``, plain CE of the one-modality concat head), ``encoder_result[m]``
being the encoder's pooled feature before the fusion (``models/avclassify_model.py``
lines 256-272) and ``configs/trainer_config.yaml`` lines 62-66 (scaling 10, window 0..80).
The authors published no code that we could find (searched: their names, "Uni-Modal
Teacher", UMT/UME repositories; huacong/ReconBoost ships only UMT/UME features), and the
paper's text beyond its abstract was not at hand, so the lines cited are BalanceBenchmark's,
and UME's rule for combining the teachers (the mean of their logits, as ``unimodal`` does)
could not be checked against it; BalanceBenchmark has no UME trainer.

Departures from that code, each for a reason:

- One run instead of three: the teachers are trained by stage 1 of the same run and live in
  the model (``model.teachers``, frozen in stage 2), so the checkpoint holds them and
  ``--resume`` at any point equals the uninterrupted run. The released UMT loads each
  teacher's newest checkpoint from a separate ``unimodalTrainer`` run, the one saved at its
  best validation accuracy; here the teachers are those at the end of stage 1.
- The budget is split (``budget``, below); the released runs give each teacher and the UMT
  run a full schedule each (``budget=per_stage``).
- The teachers' batch norm: the released teachers are never put in eval mode, so they read
  batch statistics (``teacher_norm=batch``, the default) and update running statistics
  that nothing reads; here those running statistics stay as stage 1 left them, so the
  teachers' weights and buffers are stage 1's exactly. ``teacher_norm=running`` reads the
  teachers in eval mode instead (the other reading of "frozen teacher").
- The features are the encoders' pooled vectors after the linear projection to the model
  width (every ccat encoder has one); the released ResNet's pooled 512 channels have none.

Cost: stage 1 is ``unimodal``'s step (each encoder and its head forward and backward once,
no fusion); stage 2 is Concat's step plus, inside the window, one no-grad forward of every
teacher encoder (about 4/3 of Concat's compute: a backward costs about two forwards). The
model holds two encoders per modality (twice the encoder weights in memory and in
checkpoints). Under torchrun the teachers are identical on every rank (stage 1's averaged
gradients, the loop's buffer averaging) and no method state needs synchronizing.

Unimodal accuracy: stage 2's student is feature-level (concat) fusion, so each modality's
prediction is the fused one with the other modalities zeroed (Sec. 4.1, as PMR); the
paper's own measure of uni-modal features, a linear probe of each frozen encoder, is what
``ccat probe`` reports. Stage 1's predictions are the teachers' (UME: each teacher's own
head, logits averaged), so its epochs report the ensemble's accuracy.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ccat.config import NON_NEGATIVE, MethodConfig, ModelConfig, Range
from ccat.data.pipeline import Batch
from ccat.methods.base import (METHODS, Method, Outputs, Stage, WindowEnd, in_window,
                               split_budget)
from ccat.methods.ccat import frozen_norm_stats
from ccat.methods.joint import UnimodalEnsemble
from ccat.methods.zeroing import feature_fusion_outputs
from ccat.models import MultimodalModel, build_model
from ccat.models.encoders import build_encoder
from ccat.models.fusion import FUSIONS
from ccat.step import Step, host_floats


class Phase(Enum):
    """UMT's stages, in order; each value is the name checkpoints and metrics rows record."""

    TEACHERS = "teachers"  # stage 1: the unimodal ensemble on model.teachers
    DISTILL = "distill"  # stage 2: the student, CE plus the distillation loss


@dataclass
class UMTParams:
    """UMT's hyperparameters (BalanceBenchmark's trainer_config.yaml) and the budget split."""

    RANGES: ClassVar[dict[str, Range]] = {
        "scaling": NON_NEGATIVE, "modulation_starts": NON_NEGATIVE,
        "modulation_ends": NON_NEGATIVE, "teacher_epochs": NON_NEGATIVE,
        "teacher_fraction": Range(0, 1, low_open=True, high_open=True)}
    scaling: float = 10.0  # trainer_config.yaml line 66: the weight of each modality's MSE
    modulation_starts: int = 0  # first distillation epoch with the MSE (0-based; line 64)
    modulation_ends: int = 80  # last one, included (line 65; UMT_trainer.py line 139's <=)
    # "total" (our reading, the default): teachers + distillation = optim.epochs, so UMT
    # trains what every method trains; "per_stage": each stage gets optim.epochs (teachers:
    # teacher_epochs if set), as the released runs give each teacher a full run of its own.
    budget: Literal["total", "per_stage"] = "total"
    teacher_epochs: int = 0  # stage 1 epochs; 0 = teacher_fraction of the total budget
    teacher_fraction: float = 0.5  # stage 1's share of optim.epochs (budget total), in (0, 1)
    # "batch": teachers read batch statistics, as the released ones (never in eval mode);
    # "running": teachers in eval mode (their stage-1 running statistics).
    teacher_norm: Literal["batch", "running"] = "batch"


def stage_epochs(params: UMTParams, epochs: int) -> tuple[int, int]:
    """Epochs of the teachers stage and the distillation stage for ``optim.epochs``
    (:func:`ccat.methods.base.split_budget`)."""
    return split_budget(epochs, params.budget, params.teacher_epochs, params.teacher_fraction,
                        "UMT", "teacher_epochs")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE(teacher, student), the mean over every element (nn.MSELoss(), line 144); the
    teacher's feature is a fixed target."""
    return F.mse_loss(student.float(), teacher.detach().float())


class UMTModel(MultimodalModel):
    """The student (encoders, concat fusion, one linear head) with the teachers beside it:
    ``teachers``, the unimodal ensemble's model (an encoder and a head per modality)."""

    def __init__(self, encoders: dict[str, nn.Module], fusion: nn.Module, num_classes: int,
                 teachers: MultimodalModel):
        super().__init__(encoders, fusion, num_classes)
        self.teachers = teachers

    def encoder_parameters(self, modality: str) -> Iterator[nn.Parameter]:
        """The student's and the teacher's encoder of ``modality`` (optim.encoder_lr)."""
        return itertools.chain(self.encoders[modality].parameters(),
                               self.teachers.encoders[modality].parameters())


@METHODS.register("umt")
class UMT(Method):
    fusion = "concat"  # BalanceBenchmark's model_config.yaml: BaseClassifier fusion "concat"
    Params = UMTParams

    def __init__(self, cfg: MethodConfig, epochs: int):
        super().__init__(cfg, epochs)
        self.ensemble = UnimodalEnsemble(MethodConfig(name="unimodal"), epochs)  # stage 1

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int,
                    cfg: ModelConfig) -> MultimodalModel:
        """The teachers first (the initial weights ``unimodal`` draws from the same seed),
        then the student."""
        teachers = build_model(modalities, num_classes, cfg, self.ensemble.fusion)
        encoders = {m: build_encoder(m, params, cfg) for m, params in modalities.items()}
        return UMTModel(encoders, FUSIONS.get(self.fusion)(list(modalities), cfg), num_classes,
                        teachers)

    def stages(self) -> list[Stage]:
        first, second = stage_epochs(self.params, self.epochs)
        return [Stage.of(Phase.TEACHERS, first), Stage.of(Phase.DISTILL, second)]

    def on_stage(self, stage: Stage, model: MultimodalModel) -> None:
        """Stage 1 trains only the teachers; stage 2 only the student, the teachers frozen."""
        teaching = stage.kind is Phase.TEACHERS
        model.requires_grad_(not teaching)
        model.teachers.requires_grad_(teaching)

    def distilling(self) -> bool:
        """Whether this distillation epoch lies in [modulation_starts, modulation_ends]."""
        p = self.params
        return in_window(self.epoch, p.modulation_starts, p.modulation_ends, WindowEnd.INCLUDED)

    @torch.no_grad()
    def teacher_features(self, model: MultimodalModel, batch: Batch) -> dict[str, torch.Tensor]:
        """t^m, each frozen teacher's pooled feature (lines 141-143), read as ``teacher_norm``
        says; the teachers' weights and buffers stay as they are."""
        teachers = model.teachers
        with self._teacher_mode(teachers):
            return {m: teachers.encode(batch.inputs, m).pooled for m in teachers.modalities}

    def _teacher_mode(self, teachers: nn.Module) -> contextlib.AbstractContextManager:
        if self.params.teacher_norm == "batch":
            return frozen_norm_stats(teachers)
        return _eval_mode(teachers)

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        if self.stage.kind is Phase.TEACHERS:
            return self.ensemble.train_step(model.teachers, batch, step)
        step.zero_grad()
        feats = model.encode_all(batch.inputs)
        ce = F.cross_entropy(model.fused_logits(feats), batch.label)  # lines 137-138
        out: dict[str, torch.Tensor] = {"ce": ce.detach()}
        loss = ce
        if self.distilling():  # lines 139-144
            targets = self.teacher_features(model, batch)
            mse = {m: distillation_loss(feats[m].pooled, t) for m, t in targets.items()}
            loss = ce + self.params.scaling * torch.stack(list(mse.values())).sum()
            out.update({f"mse/{m}": v.detach() for m, v in mse.items()})
        step.backward(loss)
        step.step()
        return host_floats({"loss": loss.detach(), **out})

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """Stage 1: the teachers' ensemble (UME); stage 2: the student's fused logits, each
        modality's with the others zeroed before fusion (Sec. 4.1)."""
        if self.stage.kind is Phase.TEACHERS:
            return self.ensemble.predict(model.teachers, batch)
        return feature_fusion_outputs(model, batch)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode for the block, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
