"""Joint training baselines (Table 1, first rows): Sum and Concat fusion, one CE loss;
the base of the pairwise fusions (FiLM, BiGated); and the unimodal ensemble.

``sum`` is OGM-GE's SumFusion, fc_x(z^x) + fc_y(z^y) with a head per modality (the code
Table 1's baselines come from); ``sum_tied`` is the tied form W (z^x + z^y) + b.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ccat.data.pipeline import Batch
from ccat.methods.base import METHODS, Method, Outputs, fuse_decisions, predict_outputs
from ccat.methods.zeroing import feature_fusion_outputs
from ccat.models import MultimodalModel
from ccat.step import Step, host_floats


class JointMethod(Method):
    """Encoders, fusion and classifier trained together on the fused prediction's CE."""

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        step.zero_grad()
        loss = F.cross_entropy(model.fused_logits(model.encode_all(batch.inputs)), batch.label)
        step.backward(loss)
        step.step()
        return {"loss": loss.item()}

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """Fused logits, and each modality's share of the head alone (Sec. 4.1)."""
        return predict_outputs(model, model.encode_all(batch.inputs), model.unimodal_logits)


class PairFusionMethod(JointMethod):
    """Joint training through a fusion of exactly two modalities, one modulating the
    other (its ``fusion``, from :mod:`ccat.models.fusion`, refuses other data). No head
    reads one modality alone, so each modality's prediction is the fused one with the
    other zeroed before fusion (Sec. 4.1)."""

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """Fused logits; each modality's with the other zeroed before fusion (Sec. 4.1)."""
        return feature_fusion_outputs(model, batch)


@METHODS.register("sum")
class Sum(JointMethod):
    fusion = "sum"


@METHODS.register("sum_tied")
class TiedSum(JointMethod):
    fusion = "sum_tied"


@METHODS.register("concat")
class Concat(JointMethod):
    fusion = "concat"


@METHODS.register("unimodal")
class UnimodalEnsemble(Method):
    """Each modality trained alone on its own head (weights and bias); logits averaged.

    The reference every balancing method has to beat: the untied Sum's heads, so the
    modalities share no parameter and no encoder or head sees another modality's loss.
    This is Du et al.'s Uni-Modal Ensemble (UME, ICML 2023), and UMT's teachers stage: the
    summed losses under one SGD update each modality as its own run would (SGD is per
    parameter), except that ``optim.grad_clip`` > 0 clips their joint gradient norm.
    """

    fusion = "sum"

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        step.zero_grad()
        losses = {m: F.cross_entropy(model.unimodal_logits(m, model.encode(batch.inputs, m).pooled),
                                     batch.label) for m in model.modalities}
        step.backward(torch.stack(list(losses.values())).sum())
        step.step()
        return host_floats({f"loss/{m}": v for m, v in losses.items()})

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        return predict_outputs(model, model.encode_all(batch.inputs), model.unimodal_logits,
                               lambda unimodal: fuse_decisions(unimodal, "mean"))
