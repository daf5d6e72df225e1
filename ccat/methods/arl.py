"""ARL (Wei et al., ICCV 2025): "Improving Multimodal Learning via Imbalanced Learning"
(asymmetric representation learning).

Concat fusion trained on the fused CE plus gamma times each modality's unimodal CE through
the same head (unimodal regularization: W [z^m; 0] + b). After ``start`` warm-up epochs each
step weighs the encoders asymmetrically (modality analysis): with H^m the batch's mean
prediction entropy of modality m and |o^m| its mean absolute logit summed over classes, each
normalized over the two modalities, the entropies floored at ``entropy_floor`` and inverted,
the inverses normalized again, the weights are a softmax at temperature T,

    (w^a, w^v) = softmax(T [|o^v| / H^a, |o^a| / H^v])   (normalized quantities),

and each encoder's gradient is scaled by 1 + w^m at its output (the release's GradScale).
During warm-up the unimodal CEs weigh 1 and no gradient is scaled.

The paper's text was not at hand here: its parts are named as the release's README names
them, and the rules follow the released code, shicaiwei123/ICCV2025-ARL at 358af4f6:
``main_arl_variance.py`` ``train_epoch`` L114-167 and ``models/backbone.py`` ``GradScale``
L71-86, used at L325-327 and L345-347.

``method.params.weights`` chooses what scales the gradients after warm-up:

- ``paper`` (default, the README's "modality analysis determines the weight for ARL"): the
  tempered-softmax weights above, as GradScale's weights.
- ``released``: main_arl_variance.py computes the weights (L152-153) but never hands them to
  the model; GradScale reads ``args.audio_weight`` and ``args.visual_weight``, last set to 0.5
  by the warm-up branch (L163-164), so every encoder gradient is scaled by 1.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ccat.config import FRACTION, LARGE, NON_NEGATIVE, POSITIVE, ModelConfig, Range
from ccat.data.pipeline import Batch
from ccat.methods.base import METHODS, Outputs, require_two_modalities
from ccat.methods.joint import JointMethod
from ccat.methods.zeroing import feature_fusion_outputs, without_others
from ccat.models import MultimodalModel
from ccat.step import Step, host_floats

WARMUP_WEIGHT = 0.5  # main_arl_variance.py:163-164
ENTROPY_EPS = 1e-16  # main_arl_variance.py:122-123, inside the log


class GradScale(torch.autograd.Function):
    """Identity forward; backward grad (1 + w) (backbone.py:71-86)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return z.view_as(z)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        weight, = ctx.saved_tensors
        return grad + grad * weight.to(grad.dtype), None


def logit_magnitude(logits: torch.Tensor) -> torch.Tensor:
    """sum_c mean_i |o_ic| (main_arl_variance.py:116-117)."""
    return logits.abs().mean(0).sum()


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """mean_i H(softmax(o_i)), with the release's 1e-16 inside the log (L119-123)."""
    p = logits.softmax(1)
    return (-p * torch.log(p + ENTROPY_EPS)).sum(1).mean()


def arl_weights(magnitude: torch.Tensor, entropy: torch.Tensor, temperature: float,
                floor: float) -> torch.Tensor:
    """(w^a, w^v) from the two modalities' logit magnitudes and mean entropies, each (2,)
    (L127-153): normalized entropies floored and inverted, the inverses normalized, then
    softmax(T [mag_v_n inv_a, mag_a_n inv_v])."""
    inverse = 1 / (entropy / entropy.sum()).clamp(min=floor)
    inverse = inverse / inverse.sum()
    mag = magnitude / magnitude.sum()
    return F.softmax(temperature * torch.stack([mag[1] * inverse[0], mag[0] * inverse[1]]), 0)


@METHODS.register("arl")
class ARL(JointMethod):
    fusion = "concat"  # ConcatFusion_AUXI, the release's default --fusion_method concat

    @dataclass
    class Params:
        RANGES: ClassVar[dict[str, Range]] = {
            "gamma": Range(0, LARGE), "temperature": POSITIVE, "start": NON_NEGATIVE,
            "entropy_floor": FRACTION}
        # cramed_arl.sh: --gamma 4.0 --T 8.0; main_arl_variance.py:69: --start 5 (epochs
        # 0..start are warm-up: the check is epoch > start, L150 and backbone.py:325).
        gamma: float = 4.0
        temperature: float = 8.0
        start: int = 5
        entropy_floor: float = 0.3  # L128-129: torch.clamp(..., 0.3)
        # What scales the encoder gradients after warm-up: "paper" (the tempered-softmax
        # weights) or "released" (the 0.5 the release leaves in place: module docstring).
        weights: Literal["paper", "released"] = "paper"

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int,
                    cfg: ModelConfig) -> MultimodalModel:
        require_two_modalities("arl", modalities, "its weights compare two modalities")
        return super().build_model(modalities, num_classes, cfg)

    def warming_up(self) -> bool:
        return self.epoch <= self.params.start

    def weights(self, unimodal: dict[str, torch.Tensor], world: int) -> torch.Tensor:
        """(w^a, w^v) for this batch; under torchrun from the statistics averaged over
        ranks, so every rank scales alike (the release's DataParallel sees the whole batch)."""
        if self.params.weights == "released":
            return torch.full((2,), WARMUP_WEIGHT, device=next(iter(unimodal.values())).device)
        with torch.no_grad():
            logits = [x.detach().float() for x in unimodal.values()]
            stats = torch.stack([*map(logit_magnitude, logits), *map(mean_entropy, logits)])
            if world > 1:
                dist.all_reduce(stats)
                stats = stats / world
            return arl_weights(stats[:2], stats[2:], self.params.temperature,
                               self.params.entropy_floor)

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        """L100-174: loss_f + gamma (loss_a + loss_v) (1 during warm-up), the encoders'
        gradients scaled by 1 + w^m at their output after warm-up."""
        step.zero_grad()
        feats = model.encode_all(batch.inputs)
        warmup = self.warming_up()
        weights = None
        if not warmup:  # the weights read the logits' values; GradScale leaves them as they are
            with torch.no_grad():
                weights = self.weights({m: model.fused_logits(without_others(feats, m))
                                        for m in model.modalities}, step.world)
            feats = {m: f._replace(pooled=GradScale.apply(f.pooled, weights[i]))
                     for i, (m, f) in enumerate(feats.items())}
        unimodal = {m: model.fused_logits(without_others(feats, m)) for m in model.modalities}
        fused = model.fused_logits(feats)
        losses = {m: F.cross_entropy(x, batch.label) for m, x in unimodal.items()}
        ce = F.cross_entropy(fused, batch.label)
        gamma = 1.0 if warmup else self.params.gamma
        loss = ce + gamma * torch.stack(list(losses.values())).sum()
        step.backward(loss)
        step.step()
        values: dict[str, Any] = {"loss": loss, "ce": ce,
                                  **{f"loss/{m}": v for m, v in losses.items()}}
        for i, m in enumerate(model.modalities):
            values[f"weight/{m}"] = weights[i] if weights is not None else 0.0
        return host_floats(values)

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """The fused logits; each modality's W [z^m; 0] + b (ConcatFusion_AUXI L50-51)."""
        return feature_fusion_outputs(model, batch)
