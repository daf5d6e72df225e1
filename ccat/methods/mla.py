"""MLA: Multimodal Learning with Alternating Unimodal Adaptation (Zhang et al., CVPR 2024).

Each step trains the modalities one after another, each through one shared head read by
every modality's pooled vector z^m (alternating unimodal learning). The head's
gradient is projected away from the feature directions the head has already learned
from, OWM-style, so a modality's update does not overwrite what the others taught it
(gradient modification). At test time the unimodal predictions are fused with
per-sample weights from their prediction entropies (test-time dynamic fusion).

The paper's text was not at hand here: sections are cited by their names, and the
formulas follow the paper's description and the released code (Cecile-hi/Multimodal-
Learning-with-Alternating-Unimodal-Adaptation, ``GSPlugin`` and ``calculate_gating_weights``).
The released code never projects: its ``GSPlugin`` looks for a parameter named
"module.weight", which the head it is handed (parameters "weight", "bias") never has.
Here the projection is applied, as the paper describes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ccat.config import POSITIVE, MethodConfig, Range
from ccat.data.pipeline import Batch
from ccat.methods.base import METHODS, Method, Outputs
from ccat.models import MultimodalModel
from ccat.step import Step


def project_gradient(grad: torch.Tensor, projector: torch.Tensor) -> torch.Tensor:
    """Gradient modification: the head's weight gradient (C, D) restricted to P, the
    complement of the stored feature directions; P is symmetric, so grad P^T = grad P."""
    return grad @ projector


def update_projector(projector: torch.Tensor, feature: torch.Tensor, alpha: float) -> torch.Tensor:
    """Gradient modification: P = I - A (A^T A + alpha I)^-1 A^T with one more column r of
    A, by the recursive least-squares step P <- P - (P r)(P r)^T / (alpha + r^T P r)."""
    k = projector @ feature
    return projector - torch.outer(k, k) / (alpha + feature @ k)


def entropy_weights(logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Test-time dynamic fusion: per-sample weights lambda^m = exp(-e^m) / sum exp(-e^m'),
    e^m the entropy of modality m's softmax prediction (the code's exp(max e - e^m) form
    gives the same weights). The released code takes the softmax over the batch axis and one entropy
    for the whole batch; this is the per-sample form the paper describes."""
    entropies = torch.stack([-(F.softmax(x.float(), 1) * F.log_softmax(x.float(), 1)).sum(1)
                             for x in logits.values()])  # (M, B)
    weights = F.softmax(-entropies, dim=0)
    return {m: weights[i] for i, m in enumerate(logits)}


@METHODS.register("mla")
class MLA(Method):
    fusion = "shared"

    @dataclass
    class Params:
        RANGES: ClassVar[dict[str, Range]] = {"alpha": POSITIVE}
        # Regularizer alpha of the projector (gradient modification). The released code
        # anneals it from 0.1 to 0.01 over each epoch (0.1 ** (1 + batch / batches)).
        alpha: float = 0.1
        # Test-time dynamic fusion: "entropy" (the paper) or "mean" of the unimodal logits.
        test_fusion: str = "entropy"
        # The released code divides P by its Frobenius norm after each update, which also
        # scales the head's step by 1/||P||_F; off = the paper.
        normalize_projector: bool = False

    def __init__(self, cfg: MethodConfig, epochs: int):
        super().__init__(cfg, epochs)
        if self.params.test_fusion not in ("entropy", "mean"):
            raise ValueError(f"method.params.test_fusion must be 'entropy' or 'mean', "
                             f"not {self.params.test_fusion!r}")
        self.projector: torch.Tensor | None = None  # P (D, D); None = identity, nothing stored

    def state_dict(self) -> dict[str, Any]:
        return {} if self.projector is None else {"projector": self.projector.detach().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.projector = state.get("projector")

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        """Alternating unimodal learning: one update per modality through the shared head;
        each head gradient is projected off every direction stored so far (P is never reset,
        as in the code), then the modality's mean feature is stored."""
        out: dict[str, float] = {}
        weight = model.classifier.weight
        for m in model.modalities:
            step.zero_grad()
            z = model.encode(batch.inputs, m)[1]
            loss = F.cross_entropy(model.unimodal_logits(m, z), batch.label)
            step.backward(loss)
            with torch.autocast(weight.device.type, enabled=False):
                if self.projector is not None and weight.grad is not None:
                    self.projector = self.projector.to(weight.grad)
                    weight.grad = project_gradient(weight.grad, self.projector)
                self._store(z.detach().float().mean(0), step.world)
            step.step()
            out[f"loss/{m}"] = loss.item()
        return out

    def _store(self, feature: torch.Tensor, world: int) -> None:
        """Add this modality's mean feature r (averaged over ranks, so every rank keeps
        the same P) to the directions later updates must leave alone."""
        if world > 1:
            dist.all_reduce(feature)
            feature = feature / world
        if self.projector is None:
            self.projector = torch.eye(feature.numel(), device=feature.device)
        self.projector = update_projector(self.projector.to(feature), feature, self.params.alpha)
        if self.params.normalize_projector:
            self.projector = self.projector / torch.linalg.matrix_norm(self.projector)

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """Each modality's logits from the shared head, fused per sample by entropy."""
        feats = model.encode_all(batch.inputs)
        embeddings = {m: feats[m][1] for m in model.modalities}
        unimodal = {m: model.unimodal_logits(m, z) for m, z in embeddings.items()}
        if self.params.test_fusion == "entropy":
            weights = entropy_weights(unimodal)
            fused = sum(weights[m].unsqueeze(1).to(x) * x for m, x in unimodal.items())
        else:
            fused = torch.stack(list(unimodal.values())).mean(0)
        return Outputs(fused=fused, unimodal=unimodal, embeddings=embeddings,
                       representation=torch.cat(list(embeddings.values()), 1))
