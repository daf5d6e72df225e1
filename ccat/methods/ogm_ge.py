"""OGM-GE (Peng et al., CVPR 2022): On-the-fly Gradient Modulation with Generalization
Enhancement.

Concat fusion trained on the fused CE. After the backward pass, each modality's summed
confidence in the correct class (from its block of the head) gives a discrepancy ratio;
the dominant modality's encoder gradient is damped by k = 1 - tanh(alpha * rho) (Eq. 10),
and Gaussian noise with the gradient's own spread is added (GE), inside the modulation
window of epochs.

``method.params.variant``: "paper" (the default) modulates every encoder parameter inside
epochs [modulation_starts, modulation_ends); "released" is GeWu-Lab/OGM-GE_CVPR2022
(343dc1d) main.py L132-148 exactly: the 4-D gradients (convolution kernels) only, noise
``normal_(0, std + 1e-8)``, and the window starts..ends inclusive, one epoch longer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ccat.config import NON_NEGATIVE, ConfigError, MethodConfig, Range
from ccat.data.pipeline import Batch
from ccat.methods.base import METHODS, Outputs, WindowEnd, in_window
from ccat.methods.joint import JointMethod
from ccat.methods.zeroing import feature_fusion_outputs
from ccat.models import MultimodalModel
from ccat.step import Step

MODULATIONS = ("OGM_GE", "OGM", "Normal")  # the released code's --modulation choices
TINY_SCORE = 1e-12  # keeps rho finite if every softmax score underflows
RELEASED_NOISE_EPS = 1e-8  # main.py L139: normal_(0, parms.grad.std().item() + 1e-8)


def correct_class_score(logits: torch.Tensor, label: torch.Tensor) -> float:
    """s^u = sum_i softmax(W^u z_i^u + b / 2)_{y_i}: the batch's score of one modality."""
    return logits.float().softmax(1).gather(1, label[:, None]).sum().item()


def discrepancy_ratios(scores: dict[str, float]) -> dict[str, float]:
    """rho^u = s^u / s^other for two modalities (the paper); with more, s^u over the mean
    of the others' scores (our generalization, equal to the paper's for two)."""
    ratios = {}
    for m, score in scores.items():
        others = [s for k, s in scores.items() if k != m]
        ratios[m] = score / max(sum(others) / len(others), TINY_SCORE)
    return ratios


def coefficients(ratios: dict[str, float], alpha: float) -> dict[str, float]:
    """Eq. 10: k^u = 1 - tanh(alpha * rho^u) if rho^u > 1, else 1.

    When no ratio exceeds 1 (two modalities scoring exactly alike) the first modality is
    damped all the same, as the released main.py's else-branch damps audio whenever
    ratio_v > 1 fails (k_a = 1 - tanh(alpha) at rho_a = rho_v = 1).
    """
    coefs = {m: 1.0 - math.tanh(alpha * rho) if rho > 1 else 1.0 for m, rho in ratios.items()}
    if not any(rho > 1 for rho in ratios.values()):
        first = next(iter(ratios))
        coefs[first] = 1.0 - math.tanh(alpha * ratios[first])
    return coefs


def modulate(encoder: nn.Module, coef: float, noise: bool, released: bool = False) -> None:
    """g <- k g (OGM), plus h ~ N(0, std(g)^2) elementwise with g's std before scaling (GE).

    Every parameter of the encoder, as the paper's theta^u. ``released``: the released
    code's rule exactly (main.py L132-148): only the 4-D gradients (convolution kernels)
    are touched, and GE's noise is ``zeros_like(g).normal_(0, std(g) + 1e-8)``.
    """
    for p in encoder.parameters():
        if p.grad is None:
            continue
        grad = p.grad
        if released:
            if grad.dim() != 4:
                continue
            p.grad = grad * coef + torch.zeros_like(grad).normal_(
                0, grad.std().item() + RELEASED_NOISE_EPS) if noise else grad * coef
            continue
        scaled = grad * coef
        if noise and grad.numel() > 1:
            scaled = scaled + torch.randn_like(grad) * grad.std()
        p.grad = scaled


@METHODS.register("ogm_ge")
class OGMGE(JointMethod):
    fusion = "concat"

    @dataclass
    class Params:
        RANGES: ClassVar[dict[str, Range]] = {
            "alpha": NON_NEGATIVE, "modulation_starts": NON_NEGATIVE,
            "modulation_ends": NON_NEGATIVE}
        # Released code (GeWu-Lab/OGM-GE_CVPR2022, README "Tips"): alpha 0.8 for CREMA-D,
        # 0.1 for VGGSound; --modulation OGM_GE, --modulation_starts 0, --modulation_ends 50.
        alpha: float = 0.8
        modulation: str = "OGM_GE"  # OGM_GE, OGM (no noise) or Normal (no modulation)
        modulation_starts: int = 0  # first modulated epoch (0-based)
        # First epoch no longer modulated; the released code's check is inclusive (<= ends).
        modulation_ends: int = 50
        # "paper": every encoder parameter, the window [starts, ends); "released": the
        # release's rule exactly: 4-D kernels only, std + 1e-8, and (for ogm_ge) the
        # window starts..ends inclusive on 0-based epochs (main.py L132).
        variant: Literal["paper", "released"] = "paper"

    def __init__(self, cfg: MethodConfig, epochs: int):
        super().__init__(cfg, epochs)
        if self.params.modulation not in MODULATIONS:
            raise ConfigError(f"method.params.modulation must be one of {', '.join(MODULATIONS)}, "
                              f"not {self.params.modulation!r}")

    # How variant "released" reads modulation_ends: the release's check, <= ends on 0-based
    # epochs (main.py L132, epochs from 0 at L275).
    released_window = WindowEnd.INCLUDED

    def modulating(self) -> bool:
        """Whether this epoch lies in [modulation_starts, modulation_ends), or with variant
        "released" in the release's window (WindowEnd says how the two differ by one
        epoch)."""
        p = self.params
        end = self.released_window if p.variant == "released" else WindowEnd.EXCLUDED
        return p.modulation != "Normal" and in_window(self.epoch, p.modulation_starts,
                                                      p.modulation_ends, end)

    def damping(self, ratios: dict[str, float]) -> dict[str, float]:
        """Each modality's gradient coefficient k^u for the ratios rho^u (Eq. 10)."""
        return coefficients(ratios, self.params.alpha)

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        step.zero_grad()
        feats = model.encode_all(batch.inputs)
        loss = F.cross_entropy(model.fused_logits(feats), batch.label)
        step.backward(loss)
        with torch.no_grad():  # s^u over the whole batch, summed across ranks so all agree
            scores = {m: step.all_sum(correct_class_score(
                model.unimodal_logits(m, feats[m].pooled), batch.label)) for m in model.modalities}
        ratios = discrepancy_ratios(scores)
        coefs = self.damping(ratios)
        active = self.modulating()
        if active:  # under torchrun, Step then averages the noise over ranks too
            for m in model.modalities:
                modulate(model.encoders[m], coefs[m], noise=self.params.modulation == "OGM_GE",
                         released=self.params.variant == "released")
        step.step()
        out = {"loss": loss.item()}
        out.update({f"ratio/{m}": r for m, r in ratios.items()})
        out.update({f"coef/{m}": coefs[m] if active else 1.0 for m in model.modalities})
        return out

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """Fused logits; each modality's with the other zeroed before fusion (Sec. 4.1)."""
        return feature_fusion_outputs(model, batch)
