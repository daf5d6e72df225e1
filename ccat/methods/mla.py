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

``method.params.projection`` chooses the gradient modification:

- ``paper`` (default, our reading of the paper): the exact OWM projector below, applied
  from the second update on, each modality's mean feature stored after its update.
- ``released``: what the released code really does, no projection at all: its
  ``GSPlugin.before_update`` looks for a parameter named "module.weight", which the head it
  is handed (parameters "weight", "bias") never has, so the plugin never touches a gradient.
- ``gsplugin``: the plugin's body as written, as if its name check matched: skip the very
  first call; alpha_b = alpha * 0.1 ** (b / batches) for batch b of the epoch; r the current
  modality's mean feature, k = P r^T, P <- P - (k k^T) / (alpha_b + k r), where ``k r`` is a
  D x D outer product divided elementwise; P <- P / ||P||_F; then grad <- grad P^T.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ccat.config import POSITIVE, ConfigError, MethodConfig, Range
from ccat.data.pipeline import Batch
from ccat.methods.base import METHODS, Method, Outputs, predict_outputs
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


PROJECTIONS = ("paper", "released", "gsplugin")
PLUGIN_DECAY = 0.1  # GSPlugin: alpha = 1.0 * 0.1 ** (batch_index / len_dataloader + 1)


def plugin_projector(projector: torch.Tensor, feature: torch.Tensor, alpha: float) -> torch.Tensor:
    """``gsplugin``: the released GSPlugin's update of P as written, then its Frobenius
    normalization: P - (k k^T) / (alpha + k r) elementwise, k = P r^T, ``k r`` (D, D)."""
    r = feature[None, :]  # (1, D)
    k = projector @ r.t()  # (D, 1)
    updated = projector - (k @ k.t()) / (alpha + k @ r)
    return updated / torch.linalg.matrix_norm(updated)


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
        # Regularizer alpha of the projector (gradient modification). The GSPlugin anneals
        # it from 0.1 to 0.01 over each epoch (0.1 ** (1 + batch / batches)); ``gsplugin``
        # applies that annealing to this value.
        alpha: float = 0.1
        # Test-time dynamic fusion: "entropy" (the paper) or "mean" of the unimodal logits.
        test_fusion: str = "entropy"
        # Gradient modification: "paper", "released" (none) or "gsplugin" (module docstring).
        projection: str = "paper"

    def __init__(self, cfg: MethodConfig, epochs: int):
        super().__init__(cfg, epochs)
        if self.params.test_fusion not in ("entropy", "mean"):
            raise ValueError(f"method.params.test_fusion must be 'entropy' or 'mean', "
                             f"not {self.params.test_fusion!r}")
        if self.params.projection not in PROJECTIONS:
            raise ConfigError(f"method.params.projection must be one of {', '.join(PROJECTIONS)}, "
                              f"not {self.params.projection!r}")
        self.projector: torch.Tensor | None = None  # P (D, D); None = identity, nothing stored
        self.calls = 0  # gsplugin: updates seen so far (the plugin's exp_count)
        self.batch = 0  # gsplugin: batches trained so far in this epoch

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"calls": self.calls}
        if self.projector is not None:
            state["projector"] = self.projector.detach().cpu()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.projector = state.get("projector")
        self.calls = state.get("calls", 0)

    def on_epoch(self, epoch: int) -> None:
        self.batch = 0

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        """Alternating unimodal learning: one update per modality through the shared head,
        its weight gradient modified as ``projection`` says (P is never reset, as in the
        code)."""
        out: dict[str, float] = {}
        weight = model.classifier.weight
        for m in model.modalities:
            step.zero_grad()
            z = model.encode(batch.inputs, m).pooled
            loss = F.cross_entropy(model.unimodal_logits(m, z), batch.label)
            step.backward(loss)
            if self.params.projection != "released":
                with torch.autocast(weight.device.type, enabled=False):
                    feature = self._mean_feature(z.detach().float(), step.world)
                    if self.params.projection == "paper":
                        self._project_then_store(weight, feature)
                    else:
                        self._plugin(weight, feature)
            step.step()
            out[f"loss/{m}"] = loss.item()
        self.batch += 1
        return out

    @staticmethod
    def _mean_feature(z: torch.Tensor, world: int) -> torch.Tensor:
        """This modality's mean feature r, averaged over ranks so every rank keeps one P."""
        feature = z.mean(0)
        if world > 1:
            dist.all_reduce(feature)
            feature = feature / world
        return feature

    def _project_then_store(self, weight: torch.Tensor, feature: torch.Tensor) -> None:
        """``paper``: project the head's gradient off every stored direction, then add r."""
        if self.projector is not None and weight.grad is not None:
            self.projector = self.projector.to(weight.grad)
            weight.grad = project_gradient(weight.grad, self.projector)
        if self.projector is None:
            self.projector = torch.eye(feature.numel(), device=feature.device)
        self.projector = update_projector(self.projector.to(feature), feature, self.params.alpha)

    def _plugin(self, weight: torch.Tensor, feature: torch.Tensor) -> None:
        """``gsplugin``: the released plugin's body, as if its name check matched."""
        if self.batches_per_epoch == 0:
            raise RuntimeError("MLA's gsplugin anneals alpha over the epoch's batches: call "
                               "bind_data() before train_step()")
        calls, self.calls = self.calls, self.calls + 1
        if calls == 0 or weight.grad is None:  # the plugin skips its first call
            return
        alpha = self.params.alpha * PLUGIN_DECAY ** (self.batch / self.batches_per_epoch)
        if self.projector is None:
            self.projector = torch.eye(feature.numel(), device=feature.device)
        self.projector = plugin_projector(self.projector.to(feature), feature, alpha)
        weight.grad = weight.grad @ self.projector.t().to(weight.grad)

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """Each modality's logits from the shared head, fused per sample by entropy."""
        return predict_outputs(model, model.encode_all(batch.inputs), model.unimodal_logits,
                               self.fuse)

    def fuse(self, unimodal: dict[str, torch.Tensor]) -> torch.Tensor:
        """The test-time fusion: entropy-weighted per sample, or the mean of the logits."""
        if self.params.test_fusion == "entropy":
            weights = entropy_weights(unimodal)
            return sum(weights[m].unsqueeze(1).to(x) * x for m, x in unimodal.items())
        return torch.stack(list(unimodal.values())).mean(0)
