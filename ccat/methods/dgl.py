"""DGL (Wei et al., ICCV 2025): "Boosting Multimodal Learning via Disentangled
Gradient Learning".

Concat fusion with its gradients disentangled. The fusion head (the concat classifier W, b)
reads detached features, so the fused CE trains only the head (multimodal gradient
truncation). Each encoder learns from its own unimodal loss alone, alpha CE(W_m z^m + b),
its prediction through the same head with the other modalities zeroed (unimodal
regularization, the head's parameters shared), and that loss leaves the head untouched
(unimodal gradient truncation).

The paper's text was not at hand here: its parts are named as its README names them, and
the rules follow the released code, shicaiwei123/ICCV2025-GDL at b72a55f0: ``main_dgl.py``
``train_epoch`` (L100-122: the unimodal losses times alpha backward first, the fusion
module's gradients then set to None, the fused loss backward last) and
``models/fusion_modules.py`` ``ConcatFusion_DGL`` (L45-59: the fused logits fc_out of the
detached concatenation, each modality's fc_out of its features concatenated with zeros).

Here one backward pass gives the same gradients: the unimodal logits read the head's weights
detached (so the unimodal loss reaches the encoders through W's values but gives W no
gradient), and the fused logits read the features detached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ccat.config import LARGE, Range
from ccat.data.pipeline import Batch
from ccat.methods.base import METHODS, Outputs
from ccat.methods.joint import JointMethod
from ccat.methods.zeroing import feature_fusion_outputs, without_others
from ccat.models import MultimodalModel
from ccat.models.fusion import Features
from ccat.step import Step, host_floats


def detached_features(feats: Features) -> Features:
    """``feats`` cut from the encoders: the fused loss trains the head alone (L53-54)."""
    return {m: f._replace(tokens=f.tokens.detach(), pooled=f.pooled.detach())
            for m, f in feats.items()}


def unimodal_through_frozen_head(model: MultimodalModel, feats: Features,
                                 modality: str) -> torch.Tensor:
    """W [z^m; 0] + b (L57-58), with W and b detached: the gradient reaches the encoder
    through the head's values and never the head (main_dgl.py:113-119)."""
    fused = model.fusion(without_others(feats, modality))
    return F.linear(fused, model.classifier.weight.detach(), model.classifier.bias.detach())


@METHODS.register("dgl")
class DGL(JointMethod):
    fusion = "concat"  # ConcatFusion_DGL; the release's default --fusion_method concat

    @dataclass
    class Params:
        RANGES: ClassVar[dict[str, Range]] = {"alpha": Range(0, LARGE)}
        # main_dgl.py:50 and cramed_dgl.sh: --alpha 4 for CREMA-D (the weight of the
        # unimodal losses, main_dgl.py:108).
        alpha: float = 4.0

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        """loss = alpha sum_m CE(W [z^m; 0] + b) (encoders only) + CE(W [z] + b) (head only)."""
        step.zero_grad()
        feats = model.encode_all(batch.inputs)
        fused = model.fused_logits(detached_features(feats))
        losses = {m: F.cross_entropy(unimodal_through_frozen_head(model, feats, m), batch.label)
                  for m in model.modalities}
        ce = F.cross_entropy(fused, batch.label)
        unimodal = torch.stack(list(losses.values())).sum()
        step.backward(self.params.alpha * unimodal + ce)
        step.step()
        return host_floats({"loss": ce, **{f"loss/{m}": v for m, v in losses.items()}})

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """The fused logits; each modality's W [z^m; 0] + b, as the release's valid (L200)."""
        return feature_fusion_outputs(model, batch)
