"""AMCo (Zhou et al., ICASSP 2023): Adaptive Mask Co-optimization, as BalanceBenchmark
implements it (the authors' code was not found; their paper's text was not at hand, so the
formulas cite BalanceBenchmark's code and carry no equation numbers).

The concat head read block by block: modality m's logits u^m = W^m z^m + b / M, the
fused logits a learned C x C layer ("linear_star") of their sum, sum_m u^m. Every step
draws a class mask with N = int(p_t C) zeros at random places, p_t = sin(pi / 2 *
min(eps, l_t) / eps), l_t growing by epoch / 10 per step from 0 at each epoch's start;
inside the modulation window the logits of each modality found dependent at the previous
step are multiplied by it, and the loss is CE(fused) + sum_m CE(u^m) (outside: CE(fused)
alone, no mask). A modality is dependent when its block of the softmax over all the
modalities' concatenated logits holds, averaged over the batch, more than sigma of the
mass; every modality starts an epoch independent.

Matched to GeWu-Lab/BalanceBenchmark (4c1482f): balancemm/trainer/AMCo_trainer.py
``train_loop`` L61-83 (the reset per epoch, the mask and its schedule), ``training_step``
L127-157 (the window, the losses, the dependence test); balancemm/models/avclassify_model.py
``BaseClassifierAMCoModel`` L326-384 (linear_star, the blocks with b / M, the mask, the sum);
configs/trainer_config.yaml L20-28 (sigma 0.5, eps 0.3, epochs 0 to 80; its alpha, U and
method are read but never used).

Departures from that code:

- One class mask per step for every sample: the release expands it to 2 x C and multiplies
  it into the B x C logits, which only broadcasts under its two-GPU DataParallel (each half
  of the batch gets one identical row); on one device it fails whenever B != 2.
- Under torchrun the dependence test sums the softmax mass and the sample count over ranks,
  so every rank masks alike (the masks agree: each rank's numpy generator has the run's seed).

Unimodal accuracy: u^m, each modality's block of the head (the release's
``unimodal_result``), unmasked, as its validation runs without a mask. Cost: Concat's plus
one C x C layer; one host sync per step for the dependence test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ccat.config import NON_NEGATIVE, POSITIVE, ConfigError, MethodConfig, ModelConfig, Range
from ccat.data.pipeline import Batch
from ccat.methods.base import METHODS, Method, Outputs, WindowEnd, in_window, predict_outputs
from ccat.models import MultimodalModel
from ccat.step import Step, host_floats

STAR = "star"  # the model's C x C layer over the summed logits (the release's linear_star)
PROGRESS_RATE = 10  # L83: l_t += current_epoch / 10 per step


def class_mask(eps: float, progress: float, num_classes: int) -> tuple[torch.Tensor, float]:
    """The step's class mask and p_t (L73-81): N = int(p_t C) zeros among C - N ones,
    shuffled by numpy's global generator (drawn every step, used or not)."""
    pt = np.sin(np.pi / 2 * (min(eps, progress) / eps))
    zeros = int(pt * num_classes)
    mask = np.pad(np.ones(num_classes - zeros), (0, zeros))
    np.random.shuffle(mask)
    return torch.from_numpy(mask).float(), float(pt)


def summed_logits(unimodal: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum_m u^m, added in the modalities' order (avclassify_model.py L363, L378)."""
    total = torch.zeros_like(next(iter(unimodal.values())))
    for logits in unimodal.values():
        total = total + logits
    return total


def mass_sums(unimodal: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each modality's block of softmax(concat_m u^m), summed over the batch (L146-153)."""
    probs = torch.cat(list(unimodal.values()), 1).softmax(1)
    width = probs.shape[1] // len(unimodal)
    return {m: probs[:, i * width:(i + 1) * width].sum() for i, m in enumerate(unimodal)}


@METHODS.register("amco")
class AMCo(Method):
    fusion = "concat"  # avclassify_model.py L203-204: ConcatFusion_N, read block by block

    @dataclass
    class Params:
        RANGES: ClassVar[dict[str, Range]] = {
            "sigma": Range(0, 1), "eps": POSITIVE, "modulation_starts": NON_NEGATIVE,
            "modulation_ends": NON_NEGATIVE}
        # configs/trainer_config.yaml L20-28 (AMCo).
        sigma: float = 0.5  # the softmax mass above which a modality is dependent
        eps: float = 0.3  # l_t at which the mask reaches every class
        modulation_starts: int = 0
        modulation_ends: int = 80  # the last modulated epoch: the release's check is inclusive

    def __init__(self, cfg: MethodConfig, epochs: int):
        super().__init__(cfg, epochs)
        self.progress = 0.0  # l_t
        self.dependent: dict[str, bool] = {}

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int,
                    cfg: ModelConfig) -> MultimodalModel:
        if len(modalities) < 2:
            raise ConfigError(f"method 'amco' masks a modality that others depend on and needs "
                              f"at least two; the data has {', '.join(modalities)}")
        model = super().build_model(modalities, num_classes, cfg)
        model.add_module(STAR, nn.Linear(num_classes, num_classes))  # L329
        return model

    def on_epoch(self, epoch: int) -> None:
        """Every epoch starts with l_t = 0 and no modality dependent (L61-64)."""
        self.progress, self.dependent = 0.0, {}

    def state_dict(self) -> dict[str, Any]:
        return {"progress": self.progress, "dependent": dict(self.dependent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.progress = float(state.get("progress", 0.0))
        self.dependent = {m: bool(v) for m, v in state.get("dependent", {}).items()}

    def modulating(self) -> bool:
        """Whether this epoch lies in [modulation_starts, modulation_ends] (L127, L141)."""
        p = self.params
        return in_window(self.epoch, p.modulation_starts, p.modulation_ends, WindowEnd.INCLUDED)

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        mask, pt = class_mask(self.params.eps, self.progress, model.classifier.out_features)
        self.progress += self.epoch / PROGRESS_RATE
        active = self.modulating()
        step.zero_grad()
        feats = model.encode_all(batch.inputs)
        unimodal = {m: model.unimodal_logits(m, feats[m].pooled) for m in model.modalities}
        if active:
            unimodal = {m: u * mask.to(u.device) if self.dependent.get(m) else u
                        for m, u in unimodal.items()}
        fused = getattr(model, STAR)(summed_logits(unimodal))
        losses = {"loss": F.cross_entropy(fused, batch.label)}
        if active:
            losses.update({f"loss/{m}": F.cross_entropy(u, batch.label)
                           for m, u in unimodal.items()})
        step.backward(torch.stack(list(losses.values())).sum())
        out = {"pt": pt, **{f"dependent/{m}": float(self.dependent.get(m, False))
                            for m in model.modalities}}
        if active:  # L146-155: the test for the next step, on this step's logits
            with torch.no_grad():
                local = host_floats(mass_sums({m: u.float() for m, u in unimodal.items()}))
            count = step.all_sum(float(len(batch.label)))  # L151: a float32 sum / B
            share = {m: float(torch.tensor(step.all_sum(v), dtype=torch.float32) / count)
                     for m, v in local.items()}
            self.dependent = {m: s > self.params.sigma for m, s in share.items()}
            out.update({f"share/{m}": s for m, s in share.items()})
        step.step()
        return {**host_floats(losses), **out}

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """linear_star of the summed blocks, unmasked; each modality's block u^m."""
        feats = model.encode_all(batch.inputs)
        return predict_outputs(model, feats, model.unimodal_logits,
                               lambda unimodal: getattr(model, STAR)(summed_logits(unimodal)))
