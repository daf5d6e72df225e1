"""Sample-level modality valuation (Wei, Feng, Wang, Hu, CVPR 2024): "Enhancing multimodal
cooperation via sample-level modality valuation", the sample-level re-sample method.

Concat fusion trained on the fused CE. Every sample i of the training split is valued by
the Shapley value of each modality in the game whose worth is the prediction's
correctness: v_i({a, v}) = 2 if the fused prediction is right (else 0), v_i({m}) = 1 if the
prediction with the other modality dropped is right (else 0), v_i({}) = 0, so for two
modalities phi_i^a = (v_i({a}) + v_i({a, v}) - v_i({v})) / 2 (and phi_i^v likewise), each
in {-0.5, 0, 0.5, 1, 1.5}. After the warm-up epochs every epoch is re-sampled from the
values the model of the previous epoch's end gives: the split once, plus, for each sample
and modality m with a low phi_i^m, copies of the sample in which the OTHER modality is
dropped, so that m is trained alone on it: one copy for 0.4 < phi < 1, two for
-0.1 < phi < 0.4, three for phi < -0.1 (strict bounds: a value of exactly 0.4, -0.1 or
1 and above gets none). Dropping a modality zeroes its encoder's output (pooled vector
and tokens) before fusion, for that entry only. The formulas are cited by the released
code's lines below: no copy of the paper was at hand to check its equation numbers.

Matched to the released code, GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation at
7ed12b0: code/sample_level.py ``execute_modulation`` (L75-153: the values L107-115, the
contributions L117-118, the re-sampled loader from ``epoch >= args.warmup - 1`` on,
L141-151), ``main`` (L321-336: ``warmup_epoch`` for ``epoch < args.warmup``, else
``train_epoch``, L156-181, on the loader the previous epoch's valuation built; ``--warmup``
5, L44); code/datasets/dataloader.py ``AV_KS_Dataset_sample_level`` (L152-186: the bands,
and drop = 2, the visual, for a low audio value, drop = 1, the audio, for a low visual
one); code/models/models.py
``forward(drop)`` (L62-67: the dropped modality's pooled feature set to zero before the
concat head) and ``exec_drop`` (L74-86: the same zeroing for the valuation's unimodal
predictions).

Departures from that code:

- The valuation pass reads the training split as evaluation does (no augmentation); the
  released one reads ``AV_KS_Dataset(mode="train")``, i.e. randomly cropped and flipped
  frames, with the model in eval mode. Ours is deterministic, so ``--resume`` recomputes
  exactly the values (and the epoch) of the uninterrupted run.
- The pass runs only where its values are used, before epochs ``warmup`` and later; the
  released code runs it after every epoch, the warm-up ones and the last included, where
  it only prints the mean values.
- An epoch's entries, the split's and the copies, pass through the loader's shuffle (the
  shuffle buffer, where each copy enters the stream right after its sample; the device
  cache serves the same batches) and only full batches are trained
  (the remainder, fewer than ranks x batch entries, is dropped, as every epoch here); the
  released DataLoader shuffles fully and keeps a last short batch.
- Under torchrun each rank values its share of the split and the values are summed over
  ranks before the copies are chosen, so every rank trains the same re-sampled epoch (the
  released code is single-process).
- Exactly two modalities: the released value function and bands are written for two
  (the worth of the full set, 2, is their count); other data is refused.
- The released modality-level variant (code/modality_level.py) is not included.

Unimodal accuracy: the fused prediction with the other modality zeroed before fusion, as
the released ``exec_drop`` predicts it (and as for OGM-GE).

Cost: before every re-sampled epoch, one forward pass of the encoders over the training
split in eval mode (no backward) and three heads per sample (fused, each modality
dropped): about a third of a training epoch's compute. The re-sampled epoch trains, besides
the split, one Concat step's cost per copy: 4 copies of a sample the fused prediction gets
wrong, 1 of one it gets right with only one modality right alone, none otherwise; so from
1x (all right) to 5x (all wrong) a Concat epoch. With ``data.device_cache`` the pass keeps
the training split's evaluation view in the cache besides its training view (twice the
split's memory there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ccat.config import AT_LEAST_ONE, MethodConfig, ModelConfig, Range
from ccat.data.pipeline import Batch, Extra
from ccat.methods.base import METHODS, Outputs, RunData, require_two_modalities
from ccat.methods.joint import JointMethod
from ccat.methods.zeroing import feature_fusion_outputs, without_others
from ccat.models import MultimodalModel
from ccat.models.fusion import Features
from ccat.step import Step

FULL_WORTH = 2.0  # sample_level.py L110-111: value_all = 2.0 for a right fused prediction
ALONE_WORTH = 1.0  # L112-115: value_v / value_a = 1.0 for a right unimodal prediction
# dataloader.py L156-186: (low, high, copies), strict bounds, first band that holds wins.
BANDS = ((0.4, 1.0, 1), (-0.1, 0.4, 2), (-float("inf"), -0.1, 3))


def shapley_values(fused_right: torch.Tensor,
                   alone_right: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """phi^m = (v({m}) + v({m, o}) - v({o})) / 2 per sample, for two modalities m, o
    (L117-118), from whether the fused prediction and each modality's alone are right."""
    first, second = alone_right
    worth = {m: ALONE_WORTH * right.double() for m, right in alone_right.items()}
    full = FULL_WORTH * fused_right.double()
    return {first: (worth[first] + full - worth[second]) / 2,
            second: (worth[second] + full - worth[first]) / 2}


def copies_for(values: torch.Tensor) -> torch.Tensor:
    """How many copies a value earns (dataloader.py L156-186): 1 for 0.4 < phi < 1, 2 for
    -0.1 < phi < 0.4, 3 for phi < -0.1, none otherwise (phi of exactly 0.4 or -0.1, or
    at least 1)."""
    copies = torch.zeros_like(values, dtype=torch.long)
    for low, high, count in reversed(BANDS):
        copies = torch.where((values > low) & (values < high), count, copies)
    return copies


def resampled(values: dict[str, torch.Tensor]) -> list[Extra]:
    """The epoch's extra entries: for each sample and modality m, ``copies_for(phi^m)``
    copies with the other modality dropped (L156-170: drop = 2, the visual, for a low
    audio value; L172-186: drop = 1, the audio, for a low visual one)."""
    first, second = values
    extras = []
    for kept, dropped in ((first, second), (second, first)):
        for index, count in enumerate(copies_for(values[kept]).tolist()):
            extras += [Extra(index, dropped)] * count
    return extras


def drop_modalities(feats: Features, drop: torch.Tensor | None) -> Features:
    """``feats`` with, for each sample whose ``drop`` names a modality (its position in
    ``feats``), that modality's tokens and pooled vector zeroed (models.py L62-67)."""
    if drop is None:
        return feats
    out = {}
    for position, (m, f) in enumerate(feats.items()):
        keep = drop != position
        out[m] = f._replace(tokens=torch.where(keep.view(-1, 1, 1), f.tokens, 0.0),
                            pooled=torch.where(keep.view(-1, 1), f.pooled, 0.0))
    return out


@METHODS.register("valuation")
class Valuation(JointMethod):
    fusion = "concat"

    @dataclass
    class Params:
        RANGES: ClassVar[dict[str, Range]] = {"warmup": AT_LEAST_ONE}
        # Released sample_level.py L44: --warmup 5 (the default; its README runs no other
        # setting and the repository has no CREMA-D script). The released loop cannot
        # start re-sampled (warmup 0 unpacks a plain batch as a re-sampled one).
        warmup: int = 5  # epochs 0..warmup-1 train on the split once

    def __init__(self, cfg: MethodConfig, epochs: int):
        super().__init__(cfg, epochs)
        self.extras: list[Extra] = []  # this epoch's copies (set by before_epoch)
        self.means: dict[str, float] = {}  # this epoch's mean phi^m over the split

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int,
                    cfg: ModelConfig) -> MultimodalModel:
        require_two_modalities("valuation", modalities,
                               "the released value function and bands are defined for two")
        return super().build_model(modalities, num_classes, cfg)

    def before_epoch(self, model: MultimodalModel, data: RunData) -> None:
        """From epoch ``warmup`` on, value every training sample with the model as the
        previous epoch left it and choose this epoch's copies."""
        if self.epoch < self.params.warmup:
            self.extras, self.means = [], {}
            return
        values = self.value(model, data)
        self.extras = resampled(values)
        self.means = {m: v.mean().item() for m, v in values.items()}

    @torch.no_grad()
    def value(self, model: MultimodalModel, data: RunData) -> dict[str, torch.Tensor]:
        """phi^m of every sample of the training split (index order), each rank valuing
        its share and the right/wrong flags summed over ranks (each sample is on one)."""
        model.eval()
        right = torch.zeros(data.dataset.num_samples("train"), 1 + len(model.modalities),
                            device=data.device)  # fused, then each modality alone
        for batch in data.batches("train", train=False):
            with torch.autocast(data.device.type, dtype=torch.bfloat16,
                                enabled=data.device.type == "cuda"):  # as the loop evaluates
                feats = model.encode_all(batch.inputs)
                logits = [model.fused_logits(feats)] + [
                    model.fused_logits(without_others(feats, m)) for m in model.modalities]
            right[batch.index] = torch.stack(
                [(x.argmax(1) == batch.label).float() for x in logits], 1)
        if dist.is_initialized():
            dist.all_reduce(right)
        return shapley_values(right[:, 0] > 0, {m: right[:, 1 + i] > 0
                                                for i, m in enumerate(model.modalities)})

    def epoch_extras(self) -> list[Extra]:
        return self.extras

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        """The fused CE, each copy with its dropped modality zeroed (train_epoch L171-173)."""
        step.zero_grad()
        feats = drop_modalities(model.encode_all(batch.inputs), batch.drop)
        loss = F.cross_entropy(model.fused_logits(feats), batch.label)
        step.backward(loss)
        step.step()
        return {"loss": loss.item(), **{f"shapley/{m}": v for m, v in self.means.items()}}

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """Fused logits; each modality's with the other zeroed before fusion (exec_drop)."""
        return feature_fusion_outputs(model, batch)
