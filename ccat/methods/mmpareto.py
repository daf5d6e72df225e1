"""MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance (Wei & Hu, ICML 2024).

Losses: the multimodal CE of the concat head plus each modality's CE through a unimodal
head of its own (the paper's multitask framework; the released code's AVClassifier has
the same three heads). For each encoder, the gradients of the multimodal loss g_mm and of
its unimodal loss g_u are combined (Algorithm 1): equal weights when they agree (cos > 0,
as the released MMPareto.py tests), else the two-task min-norm (MGDA) weights, and the
result rescaled to the magnitude of the plain sum g_mm + g_u. The heads get the ordinary
gradient of the summed loss. Under torchrun each rank combines its own gradients and
``step()`` averages them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ccat.config import POSITIVE, ModelConfig, Range
from ccat.data.pipeline import Batch
from ccat.methods.base import METHODS, Method, Outputs, predict_outputs
from ccat.models import MultimodalModel, build_model
from ccat.step import Step


def min_norm_weights(g1: torch.Tensor, g2: torch.Tensor) -> tuple[float, float]:
    """The two-task MGDA solution: a in [0, 1] minimizing ||a g1 + (1 - a) g2||^2, i.e.
    a = clamp((g2 - g1) . g2 / ||g1 - g2||^2, 0, 1); returns (a, 1 - a)."""
    diff = g1 - g2
    denom = float(diff @ diff)
    if denom == 0.0:
        return 0.5, 0.5
    a = min(1.0, max(0.0, float((g2 - g1) @ g2) / denom))
    return a, 1.0 - a


def pareto_combine(g_mm: torch.Tensor, g_u: torch.Tensor,
                   gamma: float = 1.0) -> tuple[torch.Tensor, float, float, float]:
    """Algorithm 1 for one encoder's flattened gradients: returns the new gradient, the
    weights (alpha_mm, alpha_u) and cos(g_mm, g_u)."""
    cos = float(F.cosine_similarity(g_mm, g_u, dim=0))
    # Direction: innocent (agreeing) unimodal gradient -> uniform weights; conflict -> MGDA.
    # Orthogonal gradients (cos = 0) count as conflicting, as in the released `cos > 0` test.
    w_mm, w_u = (0.5, 0.5) if cos > 0 else min_norm_weights(g_mm, g_u)
    combined = 2 * (w_mm * g_mm + w_u * g_u)
    # Magnitude: the norm of the summed gradient g_mm + g_u, which the combination never
    # exceeds. The paper rescales the whole encoder's gradient; the released code rescales
    # each parameter tensor on its own and multiplies by gamma = 1.5.
    norm = combined.norm()
    if norm > 0:
        combined = combined * ((g_mm + g_u).norm() / norm)
    return gamma * combined, w_mm, w_u, cos


def _flat(grads: tuple[torch.Tensor | None, ...], params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float()
                      for g, p in zip(grads, params)])


@METHODS.register("mmpareto")
class MMPareto(Method):
    fusion = "concat"

    @dataclass
    class Params:
        RANGES: ClassVar[dict[str, Range]] = {"gamma": POSITIVE}
        # Extra factor on the encoders' combined gradient; the released code uses 1.5,
        # the paper's Algorithm 1 has none (1.0).
        gamma: float = 1.0

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int,
                    cfg: ModelConfig) -> MultimodalModel:
        """The concat model with its unimodal heads, one per modality, for the unimodal losses."""
        return build_model(modalities, num_classes, cfg, self.fusion, unimodal_heads=True)

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        feats = model.encode_all(batch.inputs)
        loss_mm = F.cross_entropy(model.fused_logits(feats), batch.label)
        losses = {m: F.cross_entropy(model.unimodal_heads[m](feats[m].pooled), batch.label)
                  for m in model.modalities}
        params = {m: [p for p in model.encoders[m].parameters() if p.requires_grad]
                  for m in model.modalities}
        everything = [p for m in model.modalities for p in params[m]]
        g_mm_all = torch.autograd.grad(loss_mm, everything, retain_graph=True, allow_unused=True)
        g_mm, start = {}, 0
        for m in model.modalities:
            g_mm[m] = _flat(g_mm_all[start:start + len(params[m])], params[m])
            start += len(params[m])
        g_u = {m: _flat(torch.autograd.grad(losses[m], params[m], retain_graph=True,
                                            allow_unused=True), params[m])
               for m in model.modalities}
        step.zero_grad()
        step.backward(loss_mm + torch.stack(list(losses.values())).sum())
        out = {"loss/mm": loss_mm.item()}
        for m in model.modalities:
            grad, w_mm, w_u, cos = pareto_combine(g_mm[m], g_u[m], self.params.gamma)
            _write(params[m], grad)
            out.update({f"loss/{m}": losses[m].item(), f"cos/{m}": cos,
                        f"weight_mm/{m}": w_mm, f"weight_uni/{m}": w_u})
        step.step()
        return out

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """The concat head's logits, and each modality's own head (decision level)."""
        return predict_outputs(model, model.encode_all(batch.inputs),
                               lambda m, z: model.unimodal_heads[m](z))


def _write(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Put the flattened gradient back into the parameters' ``.grad``."""
    offset = 0
    for p in params:
        if p.grad is not None:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()
