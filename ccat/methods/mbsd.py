"""MBSD as BalanceBenchmark implements it (no release of the method's authors found; its
paper's text was not at hand, so the formulas cite BalanceBenchmark's code and carry no
equation numbers): concat fusion trained on the fused CE, each modality's CE from its block
of the head, and a distillation between the two modalities weighted per sample.

With u^m = W^m z^m + b / 2 and p^m = softmax(u^m), per sample i: p_s and p_w the larger
and the smaller of the two correct-class probabilities, w_i = p_s - p_w when either
modality's argmax is right (else 0), RS_i = sum_c (u^a_ic - u^v_ic)^2 / C and
KL_i = p_w (log p_w - p_s) (``F.kl_div(p_s, p_w)``, p_s read as a log-probability, as
released). Inside the modulation window the loss is

    CE(fused) + CE(u^a) + CE(u^v) + sum_i w_i RS_i / B + sum_i w_i KL_i / B,

outside it the fused CE alone. Every term carries its gradient, w, p_s and p_w included,
as the release fills its tensors by assignment from the graph.

Matched to GeWu-Lab/BalanceBenchmark (4c1482f) balancemm/trainer/MBSD_trainer.py
``training_step`` L107-159 and L226-229 (two modalities), balancemm/models/avclassify_model.py
L287-293 (u^m with b / M); configs/trainer_config.yaml L47-50 (epochs 0 to 80).

Departures: two modalities only (the release's three-modality branch, L160-224, reads RS
from probabilities instead of logits and averages three pairs: a different rule); at a tie
of p^a and p^v at the correct class the gradient of the max and min is split between them
(the release's Python ``max`` gives it to the first), a set of measure zero.

Unimodal accuracy: u^m, each modality's block of the head (the release's
``unimodal_result``). Cost: Concat's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ccat.config import NON_NEGATIVE, ModelConfig, Range
from ccat.data.pipeline import Batch
from ccat.methods.base import METHODS, WindowEnd, in_window, require_two_modalities
from ccat.methods.joint import JointMethod
from ccat.models import MultimodalModel
from ccat.step import Step, host_floats


def distillation_terms(logits: list[torch.Tensor], label: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_i w_i RS_i / B and sum_i w_i KL_i / B for two modalities' logits (L132-158)."""
    first, second = logits
    probs = [u.softmax(1) for u in logits]
    correct = [p.gather(1, label[:, None]).squeeze(1) for p in probs]
    right = (probs[0].argmax(1) == label) | (probs[1].argmax(1) == label)
    strong, weak = torch.maximum(*correct), torch.minimum(*correct)
    weight = torch.where(right, strong - weak, torch.zeros_like(strong))  # L147-149
    rs = ((first - second) ** 2).sum(1) / first.shape[1]  # L132
    kl = F.kl_div(strong, weak, reduction="none")  # L153: p_w (log p_w - p_s)
    return weight @ rs / len(label), weight @ kl / len(label)  # L154-158


@METHODS.register("mbsd")
class MBSD(JointMethod):
    fusion = "concat"  # avclassify_model.py L203-204, read block by block (L287-293)

    @dataclass
    class Params:
        RANGES: ClassVar[dict[str, Range]] = {
            "modulation_starts": NON_NEGATIVE, "modulation_ends": NON_NEGATIVE}
        # configs/trainer_config.yaml L47-50 (MBSD).
        modulation_starts: int = 0
        modulation_ends: int = 80  # the last epoch with the extra terms: inclusive, as released

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int,
                    cfg: ModelConfig) -> MultimodalModel:
        require_two_modalities("mbsd", modalities,
                               "its distillation compares the two modalities' predictions")
        return super().build_model(modalities, num_classes, cfg)

    def modulating(self) -> bool:
        """Whether this epoch lies in [modulation_starts, modulation_ends] (L129)."""
        p = self.params
        return in_window(self.epoch, p.modulation_starts, p.modulation_ends, WindowEnd.INCLUDED)

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        step.zero_grad()
        feats = model.encode_all(batch.inputs)
        losses = {"loss": F.cross_entropy(model.fused_logits(feats), batch.label)}
        if self.modulating():
            unimodal = [model.unimodal_logits(m, feats[m].pooled).float()
                        for m in model.modalities]
            losses.update({f"loss/{m}": F.cross_entropy(u, batch.label)
                           for m, u in zip(model.modalities, unimodal)})
            losses["loss/rs"], losses["loss/kl"] = distillation_terms(unimodal, batch.label)
        step.backward(torch.stack(list(losses.values())).sum())  # L159
        step.step()
        return host_floats(losses)
