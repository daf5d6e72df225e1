"""ReconBoost (Hua et al., ICML 2024): Boosting Can Achieve Modality Reconcilement.

Each modality m has one learner f_m(x) = Head(Enc_m(x^m)), the head shared by all of them
(the released ``common_space``); the prediction is the ensemble rho * sum_m f_m(x) over the
modalities that have joined it, rho a trained scalar (the boost rate). Training runs in
rounds; round r belongs to modality m_r = modalities[r mod M] and has two phases:

1. Boosting (``boost_epochs`` epochs): only f_{m_r} (its encoder and the head) is trained,
   on each sample's CE weighted by how little the others' ensemble already gets it right:
   with p = softmax(f_{m_r}(x)), q = softmax(rho * sum_{m' != m_r} f_{m'}(x)) (no gradient)
   and C classes, loss_i = (w1 - w2 q_{i,y_i}) * (-log p_{i,y_i}) / C. This is
   (1/C) [w1 CE(y, p) - w2 KL(y * q || p)] plus a term free of f_{m_r}: the KL-based
   reconcilement enters with a minus sign, pushing the learner away from the others where
   they are already right. The target is the label, not a residual. Before any other
   modality has joined (round 0) q_y = 1 (the released constant c0, softmaxed over one
   column), so loss_i = (w1 - w2) CE_i / C.
2. Global rectification (``rectify_epochs`` epochs): every member's encoder, the head and
   rho are trained on CE(y, rho * sum_members f_m(x)).

A modality joins the ensemble when its first round begins. The paper's text was not
available to us beyond its abstract, so the formulas are cited by the released code's
lines: huacong/ReconBoost train.py at 14ab57a, ``schedule.py`` (fixed_mode: round r picks
the r-th modality cyclically, L50-56) and ``models/dynamic_net.py`` (the ensemble,
L96-170). Boosting loss: train.py L329-340 (``out_join``: the others' sum times rho, L122-135
of dynamic_net.py; ``target``: the one-hot label); its optimizer over the turn's learner,
encoder and head (``model.fc = net_ensemble.head``, L287-288, L296); rectification: L369-402
with ``net_ensemble.parameters()`` (every member's encoder, the head and rho, L59-73). The
CREMA-D settings are the README's command (--epochs_per_stage 4 --correct_epoch 4
--weight1 5.0 --weight2 1.0 --boost_rate 1.0; Head 512 -> 256 -> ReLU -> classes).
GeWu-Lab/BalanceBenchmark's ReconBoost_trainer.py has the same loss (L337-345) and
rectification (L355-370), one epoch per phase (T_epochs 1), a linear shared head and
rho = 0.01.

Schedule on our epochs: one released epoch is one of ours. With P = boost_epochs +
rectify_epochs, epoch e is in round r = e // P, in its boosting phase while e mod P <
boost_epochs and its rectification phase after. optim.epochs need not be a multiple of P
(the last round may stop early). The round, phase and the updates made in the phase are
method state, saved with every checkpoint, so ``--resume`` continues the phase as the
uninterrupted run does; which modalities are members is a buffer of the model
(``ensemble.members``), so evaluation reads the ensemble the checkpoint holds. Under
torchrun every rank trains the same number of batches per epoch, so every rank is at the
same place in the schedule; Step averages the gradients, and nothing else needs syncing.

Departures from the released code, each for a reason:

- The released code builds a new SGD for every phase (train.py L296, L371); here the
  run's one optimizer forgets its momentum buffers at each phase's first update, which is
  what a new SGD starts from. Learning rate, momentum, weight decay and their schedule are
  the run config's, shared by every method (released: lr 0.01 for both phases, momentum
  0.9, weight decay 5e-4, batch 64, lr / 10 every 30 rounds: optim.step_size 240 here).
- The released GA term, alpha * MSE(softmax(f_m).detach(), softmax(f_other).detach())
  (L344-351), has no gradient, as both arguments are detached; it changes the printed loss
  only and is left out, with the second forward of the other learner it needs (which in
  train mode also moves that encoder's BatchNorm statistics a second time).
- No pretrained unimodal models (--use_pretrain in the README's command): every method
  here trains from scratch; this is the released path without it (an empty ensemble, c0).
- The encoders end in the projection to the model width that every ccat encoder has.
- Before any modality has had a turn the ensemble is empty and predicts zeros (released:
  the constant c0); the released best-round checkpointing is the loop's selection.
- More than two modalities: q is the softmax of the sum over all other members, as the
  released ensemble computes it; at least two are required.

Unimodal accuracy: decision-level, each modality's own learner Head(Enc_m(x^m)).

Cost per step, against Concat's one forward and one backward of every encoder: a boosting
step forwards and backwards the turn's learner and forwards each other member once without
gradient (for two modalities: two encoder forwards, one backward); a rectification step
forwards and backwards every member (Concat's cost, the head applied once per member). No
extra pass over the data; one host sync per step (the logged values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ccat.config import (AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, WIDTH, ConfigError,
                         MethodConfig, ModelConfig, Range)
from ccat.data.pipeline import Batch
from ccat.methods.base import METHODS, Method, Outputs, predict_outputs
from ccat.models import MultimodalModel, build_model
from ccat.step import Step, host_floats

BOOST, RECTIFY = "boost", "rectify"


@dataclass(frozen=True)
class Turn:
    """Where an epoch lies in the schedule: its round, phase and the round's modality."""

    round: int
    phase: str
    modality: str


def turn_at(epoch: int, modalities: list[str], boost_epochs: int, rectify_epochs: int) -> Turn:
    """The schedule (module docstring): round e // P, boosting for its first boost_epochs
    epochs, the modality picked cyclically in the data's order (schedule.py L50-56)."""
    round_, within = divmod(epoch, boost_epochs + rectify_epochs)
    return Turn(round_, BOOST if within < boost_epochs else RECTIFY,
                modalities[round_ % len(modalities)])


def boosting_loss(logits: torch.Tensor, others: torch.Tensor | None, label: torch.Tensor,
                  weight1: float, weight2: float) -> torch.Tensor:
    """mean_i (w1 - w2 q_{i,y_i}) (-log p_{i,y_i}) / C (train.py L337-340), p = softmax of
    the learner's ``logits``, q = softmax of ``others`` (rho times the other members' sum,
    no gradient); ``others`` None (no other member yet): q_y = 1."""
    log_p = logits.float().log_softmax(1).gather(1, label[:, None]).squeeze(1)
    q = others.detach().float().softmax(1).gather(1, label[:, None]).squeeze(1) \
        if others is not None else torch.ones_like(log_p)
    return (-(weight1 - weight2 * q) * log_p).mean() / logits.shape[1]


class Ensemble(nn.Module):
    """rho (the trained boost rate) and which modalities are members, 1 each (a buffer, so
    a checkpoint holds the ensemble it predicts with)."""

    def __init__(self, modalities: int, rate: float):
        super().__init__()
        self.rate = nn.Parameter(torch.tensor(float(rate)))
        self.register_buffer("members", torch.zeros(modalities, dtype=torch.uint8))

    def forward(self, logits: list[torch.Tensor]) -> torch.Tensor:
        """rho * the sum of the members' logits (one per modality, in order; zeros for none)."""
        stacked = torch.stack(logits)
        return self.rate * (self.members.to(stacked.dtype)[:, None, None] * stacked).sum(0)


def shared_head(width: int, hidden: int, num_classes: int) -> nn.Module:
    """The released common-space Head (dynamic_net.py L5-15): Linear, ReLU, Linear; one
    linear layer with ``hidden`` 0 (BalanceBenchmark's shared fc_out)."""
    if hidden == 0:
        return nn.Linear(width, num_classes)
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


@METHODS.register("reconboost")
class ReconBoost(Method):
    fusion = "shared"  # one head reads every modality's z^m (the released common_space)

    @dataclass
    class Params:
        RANGES: ClassVar[dict[str, Range]] = {
            "boost_epochs": AT_LEAST_ONE, "rectify_epochs": NON_NEGATIVE,
            "weight1": NON_NEGATIVE, "weight2": NON_NEGATIVE, "boost_rate": POSITIVE,
            "head_hidden": Range(0, WIDTH.high)}
        # The README's CREMA-D command (train.py's defaults alike, L59-60, L75-76, L57).
        boost_epochs: int = 4  # --epochs_per_stage: epochs of one modality's boosting
        rectify_epochs: int = 4  # --correct_epoch: epochs of global rectification after it
        weight1: float = 5.0  # --weight1: the CE's weight
        weight2: float = 1.0  # --weight2: the reconcilement's weight
        boost_rate: float = 1.0  # --boost_rate: rho's initial value (BalanceBenchmark: 0.01)
        head_hidden: int = 256  # the shared Head's hidden width (0 = one linear layer)

    def __init__(self, cfg: MethodConfig, epochs: int):
        super().__init__(cfg, epochs)
        self.modalities: list[str] = []
        self.turn: Turn | None = None  # the current epoch's place in the schedule
        self.phase_updates = 0  # updates made so far in the current phase (0: a new phase)

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int,
                    cfg: ModelConfig) -> MultimodalModel:
        if len(modalities) < 2:
            raise ConfigError(f"ReconBoost alternates between modalities and needs at least "
                              f"two; the data has {', '.join(modalities)}")
        model = build_model(modalities, num_classes, cfg, self.fusion)
        model.classifier = shared_head(cfg.width, self.params.head_hidden, num_classes)
        model.ensemble = Ensemble(len(modalities), self.params.boost_rate)
        self.bind_modalities(list(modalities))
        return model

    def bind_modalities(self, modalities: list[str]) -> None:
        self.modalities = modalities
        if self.turn is None:
            self.turn = self.schedule(self.epoch)

    def schedule(self, epoch: int) -> Turn:
        return turn_at(epoch, self.modalities, self.params.boost_epochs,
                       self.params.rectify_epochs)

    def on_epoch(self, epoch: int) -> None:
        """Move to ``epoch``'s place in the schedule; a new phase starts its update count."""
        turn = self.schedule(epoch)
        if self.turn is None or (turn.round, turn.phase) != (self.turn.round, self.turn.phase):
            self.phase_updates = 0
        self.turn = turn

    def state_dict(self) -> dict[str, Any]:
        """The schedule's place (round, phase, modality) and the phase's update count."""
        turn = self.turn
        return {"round": turn.round, "phase": turn.phase, "modality": turn.modality,
                "phase_updates": self.phase_updates} if turn is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.turn = Turn(int(state["round"]), str(state["phase"]), str(state["modality"]))
            self.phase_updates = int(state["phase_updates"])

    def members(self) -> list[str]:
        """The modalities in the ensemble during this round: those whose turn has come."""
        return self.modalities[:min(self.turn.round + 1, len(self.modalities))]

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        if not self.modalities:
            self.bind_modalities(model.modalities)
        if self.phase_updates == 0:
            self._new_phase(model, step)
        out = self._boost(model, batch, step) if self.turn.phase == BOOST \
            else self._rectify(model, batch, step)
        self.phase_updates += 1
        return {**out, "round": float(self.turn.round)}

    def _new_phase(self, model: MultimodalModel, step: Step) -> None:
        """A new phase: a fresh optimizer's empty momentum (train.py L296, L371), and the
        round's modality in the ensemble."""
        step.optimizer.state.clear()
        members = self.members()
        model.ensemble.members.copy_(torch.tensor([m in members for m in self.modalities],
                                                  dtype=torch.uint8))

    def _logits(self, model: MultimodalModel, batch: Batch, m: str) -> torch.Tensor:
        return model.unimodal_logits(m, model.encode(batch.inputs, m).pooled)

    def _boost(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        """One update of the turn's learner on the boosting loss (train.py L329-356)."""
        m, p = self.turn.modality, self.params
        others = [o for o in self.members() if o != m]
        step.zero_grad()
        with torch.no_grad():  # the released net_ensemble.forward(mask_model=m)
            join = model.ensemble.rate * torch.stack(
                [self._logits(model, batch, o) for o in others]).sum(0) if others else None
        loss = boosting_loss(self._logits(model, batch, m), join, batch.label,
                             p.weight1, p.weight2)
        step.backward(loss)
        step.step()
        return host_floats({"loss": loss.detach(), f"loss/{m}": loss.detach()})

    def _rectify(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        """One update of every member, the head and rho on the ensemble's CE (L397-402)."""
        step.zero_grad()
        fused = model.ensemble.rate * torch.stack(
            [self._logits(model, batch, m) for m in self.members()]).sum(0)
        loss = F.cross_entropy(fused.float(), batch.label)
        step.backward(loss)
        step.step()
        return host_floats({"loss": loss.detach(), "boost_rate": model.ensemble.rate.detach()})

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """Each modality's learner; fused: rho * the members' sum (train.py L131, test())."""
        return predict_outputs(model, model.encode_all(batch.inputs), model.unimodal_logits,
                               lambda unimodal: model.ensemble(list(unimodal.values())))
