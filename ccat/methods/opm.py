"""OPM (Wei, Hu, Du and Wen, TPAMI 2024): On-the-fly Prediction Modulation.

Concat fusion trained on the fused CE. Each step scores every modality by its summed
confidence in the correct class, s^m = sum_i softmax(W^m z_i^m + b / 2)_{y_i} (its block
of the head, as OGM-GE), and gives the dominant one a drop probability

    q^m = clip(q_base * (1 + lambda * tanh(relu(s^m / s^other - 1))), 0, 1),   0 if s^m <= s^other.

With probability p_exe the step then drops: each sample's feature of modality m is zeroed
with probability q^m, every kept feature is scaled by 1 / (1 - theta), theta = sum_m d_m q^m
/ sum_m d_m (d_m: the feature widths), and the samples with every modality dropped leave
the batch (a batch left empty is not trained on). The first ``warmup_epochs`` never drop.
The paper's text was not at hand: the formulas cite the released code.

Matched to the released code, GeWu-Lab/BML_TPAMI2024 (4b3aa4f), code/models/Classifier.py:
``calcu_q`` L58-72 (q), ``Modality_drop.execute_drop`` L31-55 (the draws, theta, the mask,
the rescaling and the kept samples; ``custom_autograd`` L9-21 is a division by 1 - theta
in both directions), ``Classifier.forward`` L112-149 (the scores from the detached head with
b / 2, the drop after warm-up); code/main.py ``train()`` L91-114 (warm-up ``epoch <= 5``,
an empty batch skipped, the fused CE alone); code/scripts/train_opm.sh (q_base 0.5, lambda
0.5, p_exe 0.7).

Departures from that code:

- The draws come from the run's seeded generators, saved in every checkpoint, so a resume
  draws what the uninterrupted run draws: the step's ``np.random.rand(1)`` from numpy's, the
  mask from torch's CPU generator, as released (the mask is drawn on the CPU there too).
- A dropped feature is the encoder's pooled vector z^m and its tokens (what ccat's fusions
  read), not the released ResNet's pooled 512-d output alone; for concat fusion the same.
- More than two modalities: rho^m = s^m / mean of the others' s (as ``ogm_ge``), where
  BalanceBenchmark's OPM_trainer.py divides by the others' sum; for two modalities both are
  the released rule.
- Under torchrun the scores are summed over ranks (every rank draws with the same q), an
  empty batch is skipped only when every rank's is, and a rank whose own kept batch is
  empty contributes a zero gradient (the released code is single-process).

Unimodal accuracy: the fused prediction with the other modality zeroed (Sec. 4.1), as for
OGM-GE. Cost: Concat's, plus one host sync per step for the scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ccat.config import FRACTION, NON_NEGATIVE, ConfigError, ModelConfig, Range
from ccat.data.pipeline import Batch
from ccat.methods.base import METHODS, Outputs
from ccat.methods.joint import JointMethod
from ccat.methods.ogm_ge import correct_class_score, discrepancy_ratios
from ccat.methods.zeroing import feature_fusion_outputs
from ccat.models import MultimodalModel
from ccat.models.fusion import Features
from ccat.step import Step


def drop_probabilities(ratios: dict[str, float], q_base: float, lam: float) -> dict[str, float]:
    """q^m = clip(q_base (1 + lambda tanh(relu(rho^m - 1))), 0, 1), or 0 when the tanh term
    is 0 (calcu_q L58-72); in float32, as the released ``q`` tensor holds it."""
    out = {}
    for m, rho in ratios.items():
        gap = math.tanh(max(rho - 1.0, 0.0))
        q = q_base * (1 + lam * gap) if gap > 0 else 0.0
        out[m] = float(torch.tensor(q, dtype=torch.float32).clamp(0.0, 1.0))
    return out


def drop_mask(q: dict[str, float], batch_size: int) -> torch.Tensor:
    """keep[i, m] ~ Bernoulli(1 - q^m), drawn from torch's CPU generator in the released
    order (L45: ``Bernoulli(1 - q).sample([B, 1])``, one row of draws per sample)."""
    probs = 1 - torch.tensor(list(q.values()), dtype=torch.float32)
    return torch.bernoulli(probs.expand(batch_size, 1, len(q))).reshape(batch_size, len(q))


def kept_share(q: dict[str, float], widths: dict[str, int]) -> float:
    """1 - theta, theta = sum_m d_m q^m / sum_m d_m (L39-41), in float32 as released."""
    d = torch.tensor([widths[m] for m in q])
    theta = (d * torch.tensor(list(q.values()), dtype=torch.float32)).sum() / d.sum()
    return 1 - theta.item()


def drop_features(feats: Features, keep: torch.Tensor, share: float) -> Features:
    """Each modality's tokens and pooled vector times its keep column, divided by ``share``
    (1 - theta), with only the samples that keep some modality (L47-54)."""
    out = {}
    for index, (m, f) in enumerate(feats.items()):
        rows = keep.any(1).to(f.pooled.device)
        column = keep[:, index].to(f.pooled.device, f.pooled.dtype)
        pooled = f.pooled * column[:, None] / share
        tokens = f.tokens * column[:, None, None] / share
        out[m] = f._replace(tokens=tokens[rows], pooled=pooled[rows],
                            mask=f.mask[rows] if f.mask is not None else None)
    return out


@METHODS.register("opm")
class OPM(JointMethod):
    fusion = "concat"  # code/main.py --fusion_method concat; Classifier.py L87 ConcatFusion

    @dataclass
    class Params:
        RANGES: ClassVar[dict[str, Range]] = {
            "q_base": FRACTION, "lam": NON_NEGATIVE, "p_exe": FRACTION,
            "warmup_epochs": NON_NEGATIVE}
        # code/scripts/train_opm.sh: --q_base 0.5 --lam 0.5 --p_exe 0.7 (BalanceBenchmark's
        # trainer_config.yaml OPM: q_base 0.4, alpha 0.5, p_exe 0.7).
        q_base: float = 0.5
        lam: float = 0.5
        p_exe: float = 0.7  # the chance that a step drops at all
        # Epochs trained without dropping: main.py L91 warm_up = epoch <= 5 (0-based), so 6.
        warmup_epochs: int = 6

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int,
                    cfg: ModelConfig) -> MultimodalModel:
        if len(modalities) < 2:
            raise ConfigError(f"method 'opm' drops the modality that dominates the others and "
                              f"needs at least two; the data has {', '.join(modalities)}")
        return super().build_model(modalities, num_classes, cfg)

    def drop(self, feats: Features, label: torch.Tensor, q: dict[str, float]
             ) -> tuple[Features, torch.Tensor, torch.Tensor | None]:
        """After warm-up, with probability p_exe (L34), the features with each modality
        dropped per sample with probability q^m and the samples kept, and the keep mask;
        else everything as it is and None."""
        if self.epoch < self.params.warmup_epochs or \
                not np.random.rand(1) >= 1 - self.params.p_exe:
            return feats, label, None
        keep = drop_mask(q, len(label))
        share = kept_share(q, {m: f.pooled.shape[1] for m, f in feats.items()})
        return drop_features(feats, keep, share), label[keep.any(1).to(label.device)], keep

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        step.zero_grad()
        feats = model.encode_all(batch.inputs)
        with torch.no_grad():  # s^m over the whole batch, summed across ranks so all agree
            scores = {m: step.all_sum(correct_class_score(
                model.unimodal_logits(m, feats[m].pooled), batch.label)) for m in model.modalities}
        ratios = discrepancy_ratios(scores)
        q = drop_probabilities(ratios, self.params.q_base, self.params.lam)
        feats, label, keep = self.drop(feats, batch.label, q)
        out = {f"ratio/{m}": r for m, r in ratios.items()}
        out.update({f"q/{m}": v for m, v in q.items()})
        out.update({f"dropped/{m}": 0.0 if keep is None else 1 - keep[:, i].mean().item()
                    for i, m in enumerate(model.modalities)})
        if step.all_sum(float(len(label))) == 0:  # main.py L96-97: an empty batch, skipped
            return out
        logits = model.fused_logits(feats)
        # A rank left with no sample still backpropagates (zero) so the ranks' updates agree.
        loss = F.cross_entropy(logits, label) if len(label) else logits.sum() * 0
        step.backward(loss)
        step.step()
        return {"loss": loss.item(), **out}

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """Fused logits; each modality's with the other zeroed before fusion (Sec. 4.1)."""
        return feature_fusion_outputs(model, batch)
