"""The unimodal accuracy protocol of Sec. 4.1 for the fusion baselines.

A modality's prediction is the fused prediction with every other modality disabled: its
tokens and pooled vector replaced by zeros before fusion (a padding mask is kept).
"""

from __future__ import annotations

from typing import Callable

import torch

from ccat.data.pipeline import Batch
from ccat.methods.base import Outputs, predict_outputs
from ccat.models import MultimodalModel
from ccat.models.fusion import Features


def without_others(feats: Features, keep: str) -> Features:
    """``feats`` with every modality but ``keep`` zeroed (tokens and pooled vector)."""
    return {m: f if m == keep else f._replace(tokens=torch.zeros_like(f.tokens),
                                               pooled=torch.zeros_like(f.pooled))
            for m, f in feats.items()}


def zeroed_unimodal(feats: Features,
                    fused_logits: Callable[[Features], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each modality's logits: ``fused_logits`` of the features with the others zeroed."""
    return {m: fused_logits(without_others(feats, m)) for m in feats}


def feature_fusion_outputs(model: MultimodalModel, batch: Batch) -> Outputs:
    """Fused logits Cls(f), the zeroed-complement unimodal logits, z^m and f."""
    feats = model.encode_all(batch.inputs)
    return predict_outputs(model, feats, zeroed_unimodal(feats, model.fused_logits))
