"""LFM: Facilitating Multimodal Classification via Dynamically Learning Modality Gap
(Yang, Wan, Jiang & Xu, NeurIPS 2024).

The supervised objective (CE of the concat head) and an unsupervised modality-matching
objective are integrated with a weight that moves during training. ``method.params.variant``:

- ``paper`` (default, our reading of the paper): L = alpha_t L_match + (1 - alpha_t) L_CE
  with contrastive learning between the modalities' pooled vectors as L_match and the
  heuristic strategy alpha_t = clip(exp(-a t), alpha_min, alpha_max) over epochs t (a = 0.3,
  clip [0.05, 0.95]: 0.95 at first, 0.05 from epoch 10), so training starts mostly on the
  modality gap and ends mostly on the labels. The schedule and its constants are those of
  the LFM repository's own history (commit f3af6ea, Crema_ours.py, ``getAlpha_heritic``).
  The paper's learning-based (bi-level) strategy is not implemented.
- ``released``: the current release (Crema_epoch.py) exactly: a head per modality, their
  logits o^a, o^v; L = 2 [w_cls(t) CE(0.5 o^a + 0.5 o^v) + w_align(t) A(o^a, o^v)] with
  A = 0.5 [KL(m || p) + KL(m || q)] on p = softmax(o^a), q = softmax(o^v), m = (p + q) / 2
  (its ``F.kl_div(p.log(), m)``), and the fitted schedule ``getAlpha_Learnable_Fitted``
  (alignment weight 0.795, 0.56, 0.18 at epochs 0, 50, 150). The other params are unused.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ccat.config import (FRACTION, NON_NEGATIVE, POSITIVE, ConfigError, MethodConfig,
                         ModelConfig, Range)
from ccat.data.pipeline import Batch
from ccat.methods.base import METHODS, Method, Outputs, predict_outputs
from ccat.models import MultimodalModel, build_model
from ccat.models.fusion import Features
from ccat.step import Step

GAP_LOSSES = ("contrastive", "js")
VARIANTS = ("paper", "released")
# The released getAlpha_Learnable_Fitted: polynomial coefficients (epoch ** 0 .. epoch ** 5)
# of the CE's weight and of the alignment's weight.
FITTED_CE = (2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06,
             2.23835486e-08, -5.39717505e-11)
FITTED_ALIGN = (7.95376296e-01, -3.35472727e-03, -1.22989557e-04, 2.92947416e-06,
                -2.23835486e-08, 5.39717505e-11)


def gap_weight(epoch: int, rate: float, low: float, high: float) -> float:
    """Heuristic strategy: alpha_t = clip(exp(-rate * t), low, high), the matching loss's
    weight at epoch t (0-based); the CE gets 1 - alpha_t."""
    return min(high, max(low, math.exp(-rate * epoch)))


def fitted_weights(epoch: int) -> tuple[float, float]:
    """``released``: the fitted schedule's (CE weight, alignment weight) at epoch t (0-based)."""
    return (sum(c * epoch ** i for i, c in enumerate(FITTED_CE)),
            sum(c * epoch ** i for i, c in enumerate(FITTED_ALIGN)))


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between two modalities' vectors: sample i's pair (a_i, b_i) is the
    positive, the batch's other samples the negatives; cosine similarity over temperature."""
    logits = F.normalize(a.float(), dim=1) @ F.normalize(b.float(), dim=1).t() / temperature
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def js_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The Jensen-Shannon divergence 0.5 [KL(p || m) + KL(q || m)] between p = softmax(a) and
    q = softmax(b), m = (p + q) / 2. Not the released code's alignment: see
    :func:`released_alignment`, whose KL terms run the other way."""
    log_p, log_q = F.log_softmax(a.float(), 1), F.log_softmax(b.float(), 1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), 0) - math.log(2)
    return (F.kl_div(log_m, log_p, reduction="batchmean", log_target=True) +
            F.kl_div(log_m, log_q, reduction="batchmean", log_target=True)) / 2


def released_alignment(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The released ``Alignment``: 0.5 [KL(m || p) + KL(m || q)] per sample, batch mean, with
    p = softmax(a), q = softmax(b), m = (p + q) / 2 (``F.kl_div(p.log(), m)`` is KL(m || p))."""
    log_p, log_q = F.log_softmax(a.float(), 1), F.log_softmax(b.float(), 1)
    m = (log_p.exp() + log_q.exp()) / 2
    return (F.kl_div(log_p, m, reduction="batchmean") +
            F.kl_div(log_q, m, reduction="batchmean")) / 2


@METHODS.register("lfm")
class LFM(Method):
    fusion = "concat"

    @dataclass
    class Params:
        RANGES: ClassVar[dict[str, Range]] = {
            "rate": NON_NEGATIVE, "alpha_min": FRACTION, "alpha_max": FRACTION,
            "temperature": POSITIVE}
        variant: str = "paper"  # "paper" or "released" (module docstring)
        rate: float = 0.3  # a in alpha_t = exp(-a t) (heuristic strategy)
        alpha_min: float = 0.05  # alpha_t is clipped to [alpha_min, alpha_max]
        alpha_max: float = 0.95
        # "contrastive" (the paper's modality matching by contrastive learning) or "js"
        # (the Jensen-Shannon divergence of the pooled vectors' softmax; not the release's).
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
        for key, allowed in (("variant", VARIANTS), ("gap_loss", GAP_LOSSES)):
            if getattr(self.params, key) not in allowed:
                raise ConfigError(f"method.params.{key} must be one of {', '.join(allowed)}, "
                                  f"not {getattr(self.params, key)!r}")

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int,
                    cfg: ModelConfig) -> MultimodalModel:
        """The concat head; ``released``: a head per modality (the release's cls_a, cls_v)."""
        fusion = "sum" if self.params.variant == "released" else self.fusion
        return build_model(modalities, num_classes, cfg, fusion)

    def gap(self, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        """The modality-matching loss, averaged over modality pairs."""
        pairs = list(itertools.combinations(embeddings.values(), 2))
        if self.params.gap_loss == "js":
            return torch.stack([js_loss(a, b) for a, b in pairs]).mean()
        return torch.stack([contrastive_loss(a, b, self.params.temperature)
                            for a, b in pairs]).mean()

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        feats = model.encode_all(batch.inputs)
        if self.params.variant == "released":
            loss, out = self._released_loss(model, feats, batch.label)
        else:
            ce = F.cross_entropy(model.fused_logits(feats), batch.label)
            match = self.gap({m: feats[m].pooled for m in model.modalities})
            alpha = gap_weight(self.epoch, self.params.rate, self.params.alpha_min,
                               self.params.alpha_max)
            loss = alpha * match + (1 - alpha) * ce
            out = {"ce": ce.item(), "gap": match.item(), "alpha": alpha}
        step.zero_grad()
        step.backward(loss)
        step.step()
        return {"loss": loss.item(), **out}

    def _released_loss(self, model: MultimodalModel, feats: Features,
                       label: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """2 [w_cls CE(mean of the unimodal logits) + w_align A(o^a, o^v)], fitted weights;
        with more than two modalities, A averaged over modality pairs."""
        logits = [model.unimodal_logits(m, feats[m].pooled) for m in model.modalities]
        ce = F.cross_entropy(torch.stack(logits).mean(0), label)
        align = torch.stack([released_alignment(a, b)
                             for a, b in itertools.combinations(logits, 2)]).mean()
        w_cls, w_align = fitted_weights(self.epoch)
        loss = 2 * (w_cls * ce + w_align * align)
        return loss, {"ce": ce.item(), "gap": align.item(), "alpha": w_align}

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """The head's logits (concat; ``released``: the sum of the per-modality heads); a
        modality alone scores its block of the head (``released``: its own head)."""
        return predict_outputs(model, model.encode_all(batch.inputs), model.unimodal_logits)
