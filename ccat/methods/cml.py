"""CML (Ma et al., ICML 2023, Calibrating Multimodal Learning) as BalanceBenchmark
implements it (the paper's text was not at hand, so the formulas cite BalanceBenchmark's
code and carry no equation numbers): concat fusion trained on the CE of the full
prediction and of the predictions with modalities removed one by one, plus a penalty when
removing a modality raises the prediction's confidence.

Each epoch shuffles the modalities; each step removes them from the end of that order,
one at a time, M - 1 times: with f the fused logits W [z^1; ...; z^M] + b, removing
modality r gives f' = f - u^r + b / M (u^r = W^r z^r + b / M: the fused logits with z^r
zeroed), and the loss is

    (CE(f) + sum_removals CE(f')) / M + lambda * sum_removals max(0, sum_i conf'_i - conf_i),

conf the highest softmax probability of the prediction before the removal and conf' after
it (the penalty is 0, with no gradient, unless the batch's summed confidence rose).
Outside the modulation window the loss is CE(f) alone.

Matched to GeWu-Lab/BalanceBenchmark (4c1482f) balancemm/trainer/CML_trainer.py
``conf_loss`` L19-22, ``train_loop`` L62-67 (the shuffle per epoch), ``training_step``
L120-209 (three and two modalities: M - 1 removals, b / M, the division by M);
``Unimodality_Calculate`` as of BalanceBenchmark 4909c17^ (avclassify_model.py L107-130:
u^m with b / M and 'output' the fused logits; the name is gone at 4c1482f, where the
trainer's call would fail); configs/trainer_config.yaml L29-33 (lambda 0.1, epochs 0 to 80).

Departures: the epoch's order comes from a generator seeded by the run's seed and the
epoch (the release shuffles with Python's global generator), so a resume repeats it.

Unimodal accuracy: the fused prediction with the other modalities zeroed (Sec. 4.1), the
prediction CML calibrates. Cost: Concat's (the removals reuse the head's logits).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ccat.config import NON_NEGATIVE, ConfigError, MethodConfig, ModelConfig, Range
from ccat.data.pipeline import Batch
from ccat.methods.base import METHODS, Outputs, WindowEnd, in_window
from ccat.methods.joint import JointMethod
from ccat.methods.zeroing import feature_fusion_outputs
from ccat.models import MultimodalModel
from ccat.step import Step, host_floats


def confidence_penalty(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """max(0, sum_i conf'_i - conf_i) of the two predictions' logits (conf_loss L19-22: a
    Python max, so 0 carries no gradient)."""
    rise = (after.softmax(1).amax(1) - before.softmax(1).amax(1)).sum()
    return torch.where(rise > 0, rise, torch.zeros_like(rise))


def removal_losses(fused: torch.Tensor, unimodal: dict[str, torch.Tensor],
                   bias: torch.Tensor, order: list[str], label: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE(f) + sum CE(f')) / M and the summed confidence penalties, removing the
    modalities from the end of ``order`` (L181-201, L135-156)."""
    count = len(unimodal)
    remaining, ce, penalty = list(order), F.cross_entropy(fused, label), 0.0
    for _ in range(count - 1):
        removed = remaining.pop()
        reduced = fused - unimodal[removed] + bias / count
        ce = ce + F.cross_entropy(reduced, label)
        penalty = penalty + confidence_penalty(fused, reduced)
        fused = reduced
    return ce / count, penalty


@METHODS.register("cml")
class CML(JointMethod):
    fusion = "concat"  # avclassify_model.py L203-204: ConcatFusion_N, read block by block

    @dataclass
    class Params:
        RANGES: ClassVar[dict[str, Range]] = {
            "lam": NON_NEGATIVE, "modulation_starts": NON_NEGATIVE,
            "modulation_ends": NON_NEGATIVE}
        # configs/trainer_config.yaml L29-33 (CML).
        lam: float = 0.1  # the confidence penalty's weight
        modulation_starts: int = 0
        modulation_ends: int = 80  # the last epoch with the removals: inclusive, as released

    def __init__(self, cfg: MethodConfig, epochs: int):
        super().__init__(cfg, epochs)
        self.seed = 0  # the run's seed (build_model)
        self.modalities: list[str] = []
        self.order: list[str] = []  # this epoch's: the last is removed first

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int,
                    cfg: ModelConfig) -> MultimodalModel:
        if len(modalities) < 2:
            raise ConfigError(f"method 'cml' removes modalities from the prediction and needs "
                              f"at least two; the data has {', '.join(modalities)}")
        self.seed = torch.initial_seed()
        self.modalities, self.order = list(modalities), list(modalities)
        return super().build_model(modalities, num_classes, cfg)

    def on_epoch(self, epoch: int) -> None:
        """The epoch's removal order: the modalities shuffled (L62-67)."""
        self.order = list(self.modalities)
        random.Random(self.seed + epoch).shuffle(self.order)

    def modulating(self) -> bool:
        """Whether this epoch lies in [modulation_starts, modulation_ends] (L170)."""
        p = self.params
        return in_window(self.epoch, p.modulation_starts, p.modulation_ends, WindowEnd.INCLUDED)

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        step.zero_grad()
        feats = model.encode_all(batch.inputs)
        fused = model.fused_logits(feats)
        if not self.modulating():  # L202-209
            loss = F.cross_entropy(fused, batch.label)
            step.backward(loss)
            step.step()
            return {"loss": loss.item()}
        unimodal = {m: model.unimodal_logits(m, feats[m].pooled) for m in model.modalities}
        ce, penalty = removal_losses(fused.float(), {m: u.float() for m, u in unimodal.items()},
                                     model.classifier.bias.float(), self.order, batch.label)
        loss = ce + self.params.lam * penalty  # L201
        step.backward(loss)
        step.step()
        return host_floats({"loss": loss, "loss/ce": ce, "loss/confidence": penalty})

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """Fused logits; each modality's with the others zeroed before fusion (Sec. 4.1)."""
        return feature_fusion_outputs(model, batch)
