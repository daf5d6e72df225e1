"""LFM: Facilitating Multimodal Classification via Dynamically Learning Modality Gap
(Yang, Wan, Jiang & Xu, NeurIPS 2024).

The supervised objective (CE of the concat head) and an unsupervised modality-matching
objective (contrastive learning between the modalities' pooled vectors) are integrated
with a weight that moves during training: L = alpha_t L_match + (1 - alpha_t) L_CE, with
the heuristic strategy alpha_t = clip(exp(-a t), alpha_min, alpha_max) over epochs t, so
training starts mostly on the modality gap and ends mostly on the labels.

The paper's text was not at hand: the schedule and its constants are those of a public
port (modalbed's ``getAlpha_heritic``: a = 0.3, clip [0.05, 0.95]); the paper's
learning-based (bi-level) strategy is not implemented.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ccat.config import FRACTION, NON_NEGATIVE, POSITIVE, MethodConfig, Range
from ccat.data.pipeline import Batch
from ccat.methods.base import METHODS, Method, Outputs
from ccat.models import MultimodalModel
from ccat.step import Step

GAP_LOSSES = ("contrastive", "js")


def gap_weight(epoch: int, rate: float, low: float, high: float) -> float:
    """Heuristic strategy: alpha_t = clip(exp(-rate * t), low, high), the matching loss's
    weight at epoch t (0-based); the CE gets 1 - alpha_t."""
    return min(high, max(low, math.exp(-rate * epoch)))


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between two modalities' vectors: sample i's pair (a_i, b_i) is the
    positive, the batch's other samples the negatives; cosine similarity over temperature."""
    logits = F.normalize(a.float(), dim=1) @ F.normalize(b.float(), dim=1).t() / temperature
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def js_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The released code's variant: Jensen-Shannon divergence between softmax(a), softmax(b)."""
    log_p, log_q = F.log_softmax(a.float(), 1), F.log_softmax(b.float(), 1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), 0) - math.log(2)
    return (F.kl_div(log_m, log_p, reduction="batchmean", log_target=True) +
            F.kl_div(log_m, log_q, reduction="batchmean", log_target=True)) / 2


@METHODS.register("lfm")
class LFM(Method):
    fusion = "concat"

    @dataclass
    class Params:
        RANGES: ClassVar[dict[str, Range]] = {
            "rate": NON_NEGATIVE, "alpha_min": FRACTION, "alpha_max": FRACTION,
            "temperature": POSITIVE}
        rate: float = 0.3  # a in alpha_t = exp(-a t) (heuristic strategy)
        alpha_min: float = 0.05  # alpha_t is clipped to [alpha_min, alpha_max]
        alpha_max: float = 0.95
        # "contrastive" (the paper's modality matching by contrastive learning) or "js":
        # the released code aligns the modalities with a Jensen-Shannon divergence instead.
        gap_loss: str = "contrastive"
        temperature: float = 0.1  # of the contrastive loss; not stated where we looked

        def relation_errors(self, prefix: str) -> list[str]:
            """The clip interval must not be empty."""
            if self.alpha_min > self.alpha_max:
                return [f"{prefix}alpha_min {self.alpha_min} must not exceed "
                        f"{prefix}alpha_max {self.alpha_max}"]
            return []

    def __init__(self, cfg: MethodConfig, epochs: int):
        super().__init__(cfg, epochs)
        if self.params.gap_loss not in GAP_LOSSES:
            raise ValueError(f"method.params.gap_loss must be one of {GAP_LOSSES}, "
                             f"not {self.params.gap_loss!r}")

    def gap(self, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        """The modality-matching loss, averaged over modality pairs."""
        pairs = list(itertools.combinations(embeddings.values(), 2))
        if self.params.gap_loss == "js":
            return torch.stack([js_loss(a, b) for a, b in pairs]).mean()
        return torch.stack([contrastive_loss(a, b, self.params.temperature)
                            for a, b in pairs]).mean()

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        feats = model.encode_all(batch.inputs)
        ce = F.cross_entropy(model.fused_logits(feats), batch.label)
        match = self.gap({m: feats[m][1] for m in model.modalities})
        alpha = gap_weight(self.epoch, self.params.rate, self.params.alpha_min,
                           self.params.alpha_max)
        loss = alpha * match + (1 - alpha) * ce
        step.zero_grad()
        step.backward(loss)
        step.step()
        return {"loss": loss.item(), "ce": ce.item(), "gap": match.item(), "alpha": alpha}

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """The concat head's logits; a modality alone scores its block of the head."""
        feats = model.encode_all(batch.inputs)
        embeddings = {m: feats[m][1] for m in model.modalities}
        fused = model.fusion(feats)
        return Outputs(fused=model.classifier(fused),
                       unimodal={m: model.unimodal_logits(m, z) for m, z in embeddings.items()},
                       embeddings=embeddings, representation=fused)
