"""AUG (Jiang, Huang and Yang, NeurIPS 2025): "Rethinking Multimodal Learning from the
Perspective of Mitigating Classification Ability Disproportion".

Each step trains the audio modality, then the video one, each through one shared classifier
fc_out (sustained boosting): modality m's prediction is fc_out(ReLU(E_m z^m)) plus, for each
classifier layer L_j added to m so far, fc_out(ReLU(L_j z^m)). With at least one added layer
its loss adds the residual terms to the prediction's CE: the CE of the prediction without the
newest layer (o), the newest layer's own CE, less ``residual_weight`` times that CE weighted
per sample by o's detached confidence in the true class. At the end of the first epoch and
of every ``max(1, epochs // 10)``-th, the confidence ratio rho = s^a / s^v (each modality's
softmax score of the true class, summed over the epoch's samples) picks the weaker
modality: rho above ``lam + band`` adds a layer to video, below ``lam - band`` to audio
(adaptive classifier assignment). Inference is alpha out_a + (1 - alpha) out_v.

The paper's text was not at hand here: its parts are cited by name, and the rules follow the
released code, njustkmg/NeurIPS25-AUG at 841d079e (``train_CREMAD.py``, ``model/AudioVideo.py``
``AVGBShareClassifier``), line numbers below.

Growth and resume. The release appends ``nn.Linear`` layers to the model as it trains. Here
the layers a run can ever add (one per check before its last epoch) are built with the model
as free slots, and a buffer ``owner`` records which modality took each slot, in order: the
model's state holds its grown shape, so ``--resume`` and ``ccat eval`` rebuild it exactly and
the optimizer holds the same parameters all run (a free slot has no gradient, so no optimizer
step, weight decay or momentum touches it). A slot is initialized when it is taken (xavier
normal weight, zero bias: ``add_layer``, AudioVideo.py:68-70), at the start of the epoch after
the check, from the run's random stream.

``method.params.grown`` chooses what trains the added layers:

- ``trained`` (default, our reading of "sustained boosting": each added classifier learns):
  the added layers are in the run's optimizer like every other parameter.
- ``released``: the release builds its SGD once, before any layer is added
  (train_CREMAD.py:201), so an added layer never moves: it stays at its initialization and
  only passes gradients to the encoder and fc_out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ccat.config import FRACTION, LARGE, NON_NEGATIVE, POSITIVE, WIDTH, MethodConfig, ModelConfig, \
    Range
from ccat.data.pipeline import Batch
from ccat.methods.base import METHODS, Method, Outputs, RunData, predict_outputs, \
    require_two_modalities
from ccat.models import MultimodalModel, build_model
from ccat.step import Step, host_floats

HEADS = "aug"  # the model's submodule holding the embeddings and the slots
FREE = -1  # owner of a slot no modality has taken


def check_every(epochs: int) -> int:
    """train_CREMAD.py:205-208: the growth check runs every epochs // 10 epochs (1 up to 10)."""
    return int(epochs / 10) if epochs > 10 else 1


def checks(epoch: int, epochs: int) -> bool:
    """train_CREMAD.py:220: whether the end of 0-based ``epoch`` runs the growth check."""
    return (epoch + 1) % check_every(epochs) == 0 or epoch == 0


def slots_needed(epochs: int) -> int:
    """Layers a run can add: one per check whose layer trains (before the last epoch)."""
    return sum(checks(e, epochs) for e in range(epochs - 1))


def weaker(ratio: float, lam: float, band: float) -> int | None:
    """train_CREMAD.py:222-228: the modality that gets a layer (0 audio, 1 video) for
    rho = s^a / s^v, or None inside the band [lam - band, lam + band]."""
    if ratio > lam + band:
        return 1
    if ratio < lam - band:
        return 0
    return None


class BoostedHeads(nn.Module):
    """AVGBShareClassifier's head (AudioVideo.py:47-60) without fc_out, which is the model's
    classifier: an embedding E_m = Linear(D, hidden) per modality and the slots for the added
    layers, each Linear(D, hidden), with ``owner`` (slot -> modality index, FREE if untaken)."""

    def __init__(self, modalities: list[str], width: int, hidden: int, slots: int,
                 trained: bool):
        super().__init__()
        self.embed = nn.ModuleDict({m: nn.Linear(width, hidden) for m in modalities})
        self.slots = nn.ModuleList(nn.Linear(width, hidden) for _ in range(slots))
        for slot in self.slots:
            slot.requires_grad_(trained)  # released: never in the optimizer
        self.register_buffer("owner", torch.full((slots,), FREE, dtype=torch.long))
        self.owners = [FREE] * slots  # the buffer on the host, read every forward

    def layers(self, index: int) -> list[nn.Linear]:
        """Modality ``index``'s added layers, in the order they were added."""
        return [slot for slot, owner in zip(self.slots, self.owners) if owner == index]

    @torch.no_grad()
    def grow(self, index: int) -> None:
        """add_layer (AudioVideo.py:67-74): the next free slot, freshly initialized, to
        modality ``index``."""
        if FREE not in self.owners:
            raise RuntimeError("AUG has no free slot left: slots_needed() undercounted")
        free = self.owners.index(FREE)
        nn.init.xavier_normal_(self.slots[free].weight)
        nn.init.zeros_(self.slots[free].bias)
        self.owner[free] = index
        self.owners[free] = index

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        """A checkpoint's ``owner`` brings its grown shape with it."""
        super()._load_from_state_dict(*args, **kwargs)
        self.owners = self.owner.tolist()


def classify(model: MultimodalModel, modality: str,
             z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``classfier`` (AudioVideo.py:75-104): (the prediction, the prediction without the newest
    added layer ``o``, the newest layer's own logits; None without added layers)."""
    heads: BoostedHeads = getattr(model, HEADS)
    fc_out = model.classifier
    out = fc_out(F.relu(heads.embed[modality](z)))
    before, newest = out, None
    layers = heads.layers(model.modalities.index(modality))
    for j, layer in enumerate(layers):
        newest = fc_out(F.relu(layer(z)))
        out = out + newest
        if j < len(layers) - 1:
            before = out
    return out, before, newest


def boosted_loss(out: torch.Tensor, before: torch.Tensor, newest: torch.Tensor | None,
                 label: torch.Tensor, residual_weight: float) -> torch.Tensor:
    """train_CREMAD.py:53-57 (audio), 66-70 (video): CE(out) alone, or with added layers
    CE(out) + CE(o) + CE(newest) - w mean_i(p_i CE_i(newest)), p_i = softmax(o_i).detach()
    at the true class (the release's CE against the soft target y * softmax(o))."""
    loss = F.cross_entropy(out, label)
    if newest is None:
        return loss
    confidence = before.detach().softmax(1).gather(1, label[:, None]).squeeze(1)
    residual = F.cross_entropy(newest, label, reduction="none")
    return (loss + F.cross_entropy(before, label) + residual.mean()
            - residual_weight * (confidence * residual).mean())


@METHODS.register("aug")
class AUG(Method):
    fusion = "shared"  # no fusion parameters: the classifier is fc_out

    @dataclass
    class Params:
        RANGES: ClassVar[dict[str, Range]] = {
            "merge_alpha": FRACTION, "lam": POSITIVE, "band": NON_NEGATIVE,
            "residual_weight": Range(0, LARGE), "hidden": WIDTH}
        # train_CREMAD.py:166: --merge_alpha 0.4, inference alpha out_a + (1 - alpha) out_v.
        merge_alpha: float = 0.4
        # train_CREMAD.py:165: --lam 1.0, the ratio's target; 222, 225: its band +- 0.01.
        lam: float = 1.0
        band: float = 0.01
        # train_CREMAD.py:57, 70: 0.5 (its comment says 0.2; the code runs 0.5).
        residual_weight: float = 0.5
        # AudioVideo.py:48-57: the embeddings' and added layers' width (512 -> 256).
        hidden: int = 256
        # What trains an added layer: "trained" (the optimizer) or "released" (nothing).
        grown: Literal["trained", "released"] = "trained"

    def __init__(self, cfg: MethodConfig, epochs: int):
        super().__init__(cfg, epochs)
        self.scores: torch.Tensor | None = None  # (s^a, s^v) summed over this epoch so far
        self.ratio = float("nan")  # the last check's rho

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int,
                    cfg: ModelConfig) -> MultimodalModel:
        """The encoders, fc_out = Linear(hidden, C) as the classifier and the boosted heads,
        the head's layers initialized as the release's weight_init (utils.py:81-84)."""
        require_two_modalities("aug", modalities, "its ratio compares audio with video")
        p = self.params
        model = build_model(modalities, num_classes, cfg, self.fusion)
        model.classifier = nn.Linear(p.hidden, num_classes)
        heads = BoostedHeads(list(modalities), cfg.width, p.hidden, slots_needed(self.epochs),
                             trained=p.grown == "trained")
        model.add_module(HEADS, heads)
        for layer in (model.classifier, *heads.embed.values()):
            nn.init.xavier_normal_(layer.weight)
            nn.init.zeros_(layer.bias)
        return model

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"ratio": self.ratio}
        if self.scores is not None:
            state["scores"] = self.scores.detach().cpu()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ratio = float(state.get("ratio", float("nan")))
        self.scores = state.get("scores")

    def before_epoch(self, model: MultimodalModel, data: RunData) -> None:
        """train_CREMAD.py:220-228: after a checked epoch, a layer to the weaker modality."""
        scores, self.scores = self.scores, None
        if self.epoch == 0 or scores is None or not checks(self.epoch - 1, self.epochs):
            return
        scores = scores.to(data.device, torch.float64)
        if data.world > 1:
            dist.all_reduce(scores)
        score_a, score_v = scores.tolist()
        if score_v <= 0:
            return
        self.ratio = score_a / score_v  # train_CREMAD.py:96
        index = weaker(self.ratio, self.params.lam, self.params.band)
        if index is not None:
            getattr(model, HEADS).grow(index)

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        """train_CREMAD.py:47-85: both encoders, then the audio update, then the video one
        (whose head is read after the audio update moved fc_out)."""
        feats = {m: model.encode(batch.inputs, m).pooled for m in model.modalities}
        losses, scores = {}, []
        for m in model.modalities:
            step.zero_grad()
            out, before, newest = classify(model, m, feats[m])
            loss = boosted_loss(out, before, newest, batch.label, self.params.residual_weight)
            step.backward(loss)
            step.step()
            losses[m] = loss
            scores.append(out.detach().float().softmax(1).gather(1, batch.label[:, None]).sum())
        scores = torch.stack(scores).double()
        self.scores = scores if self.scores is None else self.scores + scores
        alpha = self.params.merge_alpha
        first, second = model.modalities
        heads: BoostedHeads = getattr(model, HEADS)
        out = host_floats({"loss": alpha * losses[first] + (1 - alpha) * losses[second],
                           **{f"loss/{m}": v for m, v in losses.items()},
                           **{f"layers/{m}": float(len(heads.layers(i)))
                              for i, m in enumerate(model.modalities)}})
        if self.ratio == self.ratio:  # the last check's rho, once there was one
            out["ratio"] = self.ratio
        return out

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """train_CREMAD.py:125-128: each modality's boosted prediction, fused as
        alpha out_a + (1 - alpha) out_v."""
        return predict_outputs(model, model.encode_all(batch.inputs),
                               lambda m, z: classify(model, m, z)[0], self.fuse)

    def fuse(self, unimodal: dict[str, torch.Tensor]) -> torch.Tensor:
        first, second = unimodal.values()
        return self.params.merge_alpha * first + (1 - self.params.merge_alpha) * second
