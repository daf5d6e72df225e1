"""MMCosine (Xu et al., ICASSP 2023): Multi-Modal Cosine loss.

The concat model's head W = [W^1, ..., W^M] is read block by block, as Concat's unimodal
logits are, but with each modality's feature and each class's weight row L2-normalized
and the bias dropped: a modality's logits are s * cos(W^m_j, z^m) for every class j. The
fused logits are their sum, and the loss is the CE of that sum (the paper's MMCosine
loss). Matched to the released GeWu-Lab/MMCosine_ICASSP23 main_CD.py, train_epoch()
lines 112-118 (the cosine logits and their sum) and line 141 (the loss, with its default
--lam 0), for any number of modalities as BalanceBenchmark's MMCosine_trainer.py does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ccat.config import POSITIVE, Range
from ccat.data.pipeline import Batch
from ccat.methods.base import METHODS, Method, Outputs, fuse_decisions, predict_outputs
from ccat.models import MultimodalModel
from ccat.models.fusion import Features
from ccat.step import Step


def cosine_logits(z: torch.Tensor, weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """s * cos(W_j, z_i) for every sample i and class j: z (B, D), weight (C, D).

    The released code's torch.mm(F.normalize(a, dim=1), F.normalize(W^T, dim=0)) * s,
    W^T normalized over the feature axis, i.e. each class's row of W to unit length.
    """
    return F.normalize(z, dim=1) @ F.normalize(weight, dim=1).t() * scaling


@METHODS.register("mmcosine")
class MMCosine(Method):
    fusion = "concat"

    @dataclass
    class Params:
        RANGES: ClassVar[dict[str, Range]] = {"scaling": POSITIVE}
        # The scale s of the cosine logits: the released main_CD.py's --scaling default
        # (line 59) and its README's CREMA-D command (--scaling 10). BalanceBenchmark uses 15.
        scaling: float = 10.0

    def unimodal_logits(self, model: MultimodalModel, feats: Features) -> dict[str, torch.Tensor]:
        """Each modality's cosine logits against its block W^m of the concat head."""
        width = model.fusion.width
        weight = model.classifier.weight
        return {m: cosine_logits(feats[m].pooled, weight[:, k * width:(k + 1) * width],
                                 self.params.scaling)
                for k, m in enumerate(model.modalities)}

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        """One SGD step on CE(sum_m s * cos(W^m, z^m), y); the head's bias gets no gradient.

        The released code adds lam * NCE(a, v) to the loss (its supplementary material);
        its default lam is 0, so that term is left out.
        """
        step.zero_grad()
        unimodal = self.unimodal_logits(model, model.encode_all(batch.inputs))
        loss = F.cross_entropy(fuse_decisions(unimodal, "sum"), batch.label)
        step.backward(loss)
        step.step()
        with torch.no_grad():  # the released code logs each modality's CE too (lines 142-143)
            out = {f"loss/{m}": F.cross_entropy(v, batch.label).item() for m, v in unimodal.items()}
        return {"loss": loss.item(), **out}

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """Each modality's cosine logits (its unimodal accuracy, Sec. 4.1's decision-level
        rule, as the released valid() lines 185-189) and their sum as the fused logits.

        Departure: the released valid() reads the fused prediction from the plain head
        W [z^1; z^2] + b (line 196 uses the forward's `out`), which MMCosine never trains;
        we predict with the sum it trains, as BalanceBenchmark's validation_step does.
        """
        feats = model.encode_all(batch.inputs)
        return predict_outputs(model, feats, self.unimodal_logits(model, feats),
                               lambda unimodal: fuse_decisions(unimodal, "sum"))
