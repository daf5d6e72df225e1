"""PMR (Fan et al., CVPR 2023): Prototypical Modal Rebalance.

Concat fusion trained on the fused CE plus a prototypical cross-entropy (PCE) on the
slow-learning modality. Each modality m keeps one prototype per class, c^m_k, the mean
pooled feature z^m of class k; its non-parametric classifier scores a sample by
softmax_k(-||z^m - c^m_k||_2), and PCE is that classifier's CE. The modalities' summed
correct-class prototypical scores give the ratio rho; the modality with the lower score
gets alpha * PCE added to the loss, inside an epoch window. The formulas are cited by the
released code's lines below: no copy of the paper was at hand to check its equation
numbers against.

Matched to the released code, fanyunfeng-bit/Modal-Imbalance-PMR, main_Prototype_grad.py:
``EU_dist`` (L69-75) and ``audio_sim = -EU_dist(a, audio_proto)`` (L152-153); the scores,
ratio, hard 0 / alpha switch and loss (L156-178); ``calculate_prototype`` (L383-441, called
at L539 and L557): the class means of the encoders' features over the first
``len(loader) // 10`` training batches, mixed with the previous prototypes by
``momentum_coef`` after every epoch but the first.

Departures from that code:

- No extra pass over the data. The released code runs the model once more, in eval mode,
  over a tenth of the training batches after every epoch (and once before training). Here
  the prototypes for epoch e are the class means of the detached train-mode features of the
  last ``max(1, batches // 10)`` training batches of epoch e - 1, taken from the training
  forward pass itself (the model a few steps before the epoch's end, not after it, with
  batch norm in train mode). Epoch 0 has no previous epoch: its first
  ``max(1, batches // 10)`` batches train on the fused CE alone while they build the first
  prototypes (the released code builds them from the untrained model instead). Cost: one
  ``index_add`` per modality per step, no extra forward pass.
- The paper's prototype-based entropy regularizer (PER) is not in the released code
  (main_Prototype_grad.py, nor GeWu-Lab/BalanceBenchmark's PMR_trainer.py, which
  re-implements the same hard switch); we follow the released rule and add no PER term.
- Distances are ``torch.cdist``, whose gradient is finite where a feature equals its
  prototype (distance 0); the released ``sqrt(dot(d, d))`` (L69-75) gives NaN gradients
  there (inf x 0), which its step writes into that modality's encoder.
- A class absent from the prototype window keeps its previous prototype (the zero vector
  before it has one); the released code divides by a zero count there (NaN prototypes).
- Under torchrun the per-class sums and counts are summed over ranks before the means, and
  the scores of rho are summed over ranks, so every rank uses the same prototypes and
  coefficient (the released code is single-process).
- More than two modalities: rho^m = s^m / mean of the others' s (as ``ogm_ge``); every
  modality with rho^m < 1 gets alpha * PCE. For two modalities this is the released rule.

Unimodal accuracy (Sec. 4.1 of CCAT's protocol): the fused prediction with the other
modality zeroed before fusion, as for OGM-GE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ccat.config import FRACTION, NON_NEGATIVE, MethodConfig, ModelConfig, Range
from ccat.data.pipeline import Batch
from ccat.methods.base import METHODS, Outputs, WindowEnd, in_window
from ccat.methods.joint import JointMethod
from ccat.methods.ogm_ge import discrepancy_ratios
from ccat.methods.zeroing import feature_fusion_outputs
from ccat.models import MultimodalModel
from ccat.step import Step, host_floats

PROTOTYPE_SHARE = 10  # calculate_prototype stops after len(dataloader) // 10 batches


def prototypical_logits(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """-||z_i - c_k||_2 for every sample i and class k (L152-153: -EU_dist(a, audio_proto))."""
    return -torch.cdist(z.float(), prototypes.float())


def prototypical_score(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """s^m = sum_i softmax(-d(z_i^m, c^m))_{y_i}, the batch's summed score (L158-159)."""
    return logits.softmax(1).gather(1, label[:, None]).sum()


def pce_coefficients(ratios: dict[str, float], alpha: float) -> dict[str, float]:
    """The released switch (L169-177): alpha for a modality whose rho is below 1, else 0
    (a tie: 0 for both, as ``beta = lam = 0`` when ratio_a_p == 1)."""
    return {m: alpha if rho < 1 else 0.0 for m, rho in ratios.items()}


def class_means(sums: torch.Tensor, counts: torch.Tensor,
                previous: torch.Tensor | None) -> torch.Tensor:
    """c_k = sum of class k's features / their count (L417-433); a class with no feature
    keeps ``previous``'s row (zeros without one)."""
    fallback = previous if previous is not None else torch.zeros_like(sums)
    seen = counts > 0
    return torch.where(seen[:, None], sums / counts.clamp(min=1)[:, None], fallback)


@METHODS.register("pmr")
class PMR(JointMethod):
    fusion = "concat"

    @dataclass
    class Params:
        RANGES: ClassVar[dict[str, Range]] = {
            "alpha": NON_NEGATIVE, "momentum_coef": FRACTION,
            "modulation_starts": NON_NEGATIVE, "modulation_ends": NON_NEGATIVE}
        # Released bash.sh L217/L222, CREMA-D with concat fusion: --modulation Proto
        # --alpha 2.0 --momentum_coef 0.0 --modulation_starts 0 --modulation_ends 70.
        alpha: float = 2.0
        momentum_coef: float = 0.0  # c <- (1 - m) c_new + m c_old, from epoch 2 on
        modulation_starts: int = 0  # first epoch with PCE (0-based)
        modulation_ends: int = 70  # last epoch with PCE: the released check is inclusive

    def __init__(self, cfg: MethodConfig, epochs: int):
        super().__init__(cfg, epochs)
        self.prototypes: dict[str, torch.Tensor] = {}  # modality -> (classes, D)
        self.sums: dict[str, torch.Tensor] = {}  # the window's per-class feature sums
        self.counts: torch.Tensor | None = None  # the window's per-class sample counts
        self.batch_index = 0  # the batch within the epoch
        self.num_classes = 0  # set by build_model

    def state_dict(self) -> dict[str, Any]:
        return {"prototypes": self.prototypes, "sums": self.sums, "counts": self.counts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prototypes = dict(state.get("prototypes", {}))
        self.sums = dict(state.get("sums", {}))
        self.counts = state.get("counts")

    def window(self) -> int:
        """How many batches feed one prototype refresh: max(1, batches // 10)."""
        if self.batches_per_epoch == 0:
            raise RuntimeError("PMR's prototype window needs the batches per epoch: call "
                              "bind_data() before train_step()")
        return max(1, self.batches_per_epoch // PROTOTYPE_SHARE)

    def on_epoch(self, epoch: int) -> None:
        """Refresh the prototypes from the window the previous epoch ended with."""
        self.batch_index = 0
        if epoch > 0 and self.counts is not None:
            self.refresh()

    def refresh(self) -> None:
        """c^m from the window's sums (summed over ranks); from epoch 2 on mixed with the
        old c^m by the momentum (L435-440, the ``epoch <= 0`` case: the released
        prototypes built before training and after epoch 0 are not mixed)."""
        counts = self.counts.clone()
        if dist.is_initialized():
            dist.all_reduce(counts)
        for m, sums in self.sums.items():
            sums = sums.clone()
            if dist.is_initialized():
                dist.all_reduce(sums)
            old = self.prototypes.get(m)
            new = class_means(sums, counts, old)
            if self.epoch >= 2 and old is not None:
                new = (1 - self.params.momentum_coef) * new + self.params.momentum_coef * old
            self.prototypes[m] = new
        self.sums, self.counts = {}, None

    def accumulate(self, feats: dict[str, torch.Tensor], label: torch.Tensor) -> None:
        """Add the batch's detached features to the window's per-class sums."""
        if self.counts is None:
            self.counts = torch.zeros(self.num_classes, device=label.device)
        self.counts.index_add_(0, label, torch.ones_like(label, dtype=self.counts.dtype))
        for m, z in feats.items():
            z = z.detach().float()
            sums = self.sums.setdefault(m, torch.zeros(self.num_classes, z.shape[1],
                                                       device=z.device))
            sums.index_add_(0, label, z)

    def in_window(self) -> bool:
        """Whether this batch feeds the next refresh: the first window of epoch 0 (before
        any prototype exists), else the last window of every epoch."""
        if not self.prototypes:
            return self.batch_index < self.window()
        return self.batch_index >= self.batches_per_epoch - self.window()

    def modulating(self) -> bool:
        """Whether this epoch lies in [modulation_starts, modulation_ends], both included."""
        p = self.params
        return in_window(self.epoch, p.modulation_starts, p.modulation_ends, WindowEnd.INCLUDED)

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int,
                    cfg: ModelConfig) -> MultimodalModel:
        self.num_classes = num_classes  # the prototypes' rows
        return super().build_model(modalities, num_classes, cfg)

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        step.zero_grad()
        feats = model.encode_all(batch.inputs)
        pooled = {m: feats[m].pooled for m in model.modalities}
        ce = F.cross_entropy(model.fused_logits(feats), batch.label)
        building = not self.prototypes  # epoch 0's first window: no prototype yet
        if self.in_window():
            self.accumulate(pooled, batch.label)
        # While building, pce and ratio are logged against this rank's class means so far
        # and not trained on (coefficients 0).
        prototypes = {m: class_means(s, self.counts, None) for m, s in self.sums.items()} \
            if building else self.prototypes
        loss, extra = self.rebalanced(ce, pooled, batch.label, step, prototypes,
                                      active=self.modulating() and not building)
        step.backward(loss)
        step.step()
        self.batch_index += 1
        if building and self.batch_index == self.window():
            self.refresh()
        return {"loss": loss.item(), "ce": ce.item(), **extra}

    def rebalanced(self, ce: torch.Tensor, pooled: dict[str, torch.Tensor],
                   label: torch.Tensor, step: Step, prototypes: dict[str, torch.Tensor],
                   active: bool) -> tuple[torch.Tensor, dict[str, float]]:
        """CE + sum_m beta^m PCE^m (L156-178; beta^m = 0 unless ``active``), and the step's
        pce, ratio and coefficients."""
        logits = {m: prototypical_logits(z, prototypes[m]) for m, z in pooled.items()}
        with torch.no_grad():
            scores = {m: step.all_sum(prototypical_score(v, label).item())
                      for m, v in logits.items()}
        ratios = discrepancy_ratios(scores)
        coefs = pce_coefficients(ratios, self.params.alpha) if active \
            else {m: 0.0 for m in logits}
        pce = {m: F.cross_entropy(v, label) for m, v in logits.items()}
        loss = ce + sum(coefs[m] * pce[m] for m in pce)
        extra = host_floats({f"pce/{m}": v.detach() for m, v in pce.items()})
        extra.update({f"ratio/{m}": r for m, r in ratios.items()})
        extra.update({f"coef/{m}": c for m, c in coefs.items()})
        return loss, extra

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """Fused logits; each modality's with the other zeroed before fusion (Sec. 4.1)."""
        return feature_fusion_outputs(model, batch)
