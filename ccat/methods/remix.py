"""Data Remixing (Ma et al., ICML 2025): "Improving Multimodal Learning Balance and
Sufficiency through Data Remixing".

Concat fusion with a head per modality besides the fused one. During ``warmup`` epochs every
batch trains CE(fused) + alpha CE(audio head) + beta CE(video head). After it, before each
epoch, every training sample is assigned to the modality it is less confident in (data
decoupling): with p^m the softmax of modality m's own head, the one whose KL(p^m || uniform)
is smaller, ties to video. The epoch then trains each sample once, in single-modality
batches (data reassembling): a video batch has the audio features zeroed and trains
CE(W [0; z^v] + b) + gamma1 CE(video head), an audio batch CE(W [z^a; 0] + b) + gamma2 CE(audio
head). Audio is the data's first modality, video its second (exactly two).

The paper's text was not at hand here: its parts are named, and the rules follow the
released code, MatthewMaxy/Remix_ICML2025 at 80898aa0: ``train.py`` (``kl_divergence``
L52-57, ``remix`` L60-99, ``train_epoch`` L101-125, ``special_train_epoch`` L127-173, the
epoch loop L240-250) and ``models/models.py`` (``AVClassifier`` L34-67: the concat head, the
unimodal heads, the zeroing of the other modality's features).

The epoch stays the loader's: the run's loader streams the training split as for any method
(each sample once, the remainder of full batches dropped, see :mod:`ccat.data.pipeline`), and
each batch's samples join a queue of their assigned modality; a queue that holds a batch's
worth of samples trains it, and the last batch of the epoch trains what is left in both
queues (video first, as the release trains its video subset first). So every sample the
loader yields trains exactly once, with its assigned modality, in a single-modality batch of
the run's batch size (the last two may be smaller, as the release's loaders keep their last
partial batches).

Departures from the release:

- The two subsets are interleaved through the epoch as their queues fill; the release trains
  the whole video subset, then the whole audio subset, each from a loader of its own.
- A single-modality batch runs only its modality's encoder; the release also runs the other
  encoder and zeroes its output in place, so its batch norm statistics follow those batches
  too.
- The assignment pass reads the training split as evaluation does (no augmentation, eval
  mode), as the release's ``train_val_dataloader`` does; it is recomputed on ``--resume``
  from the checkpoint's model.
- Runs under torchrun are refused: each rank's queues fill at their own pace, so the ranks
  would not update in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ccat.config import LARGE, NON_NEGATIVE, MethodConfig, ModelConfig, Range
from ccat.data.pipeline import PAD_ID, Batch
from ccat.errors import CcatError
from ccat.methods.base import METHODS, Method, Outputs, RunData, predict_outputs, \
    require_two_modalities
from ccat.models import MultimodalModel, build_model
from ccat.models.fusion import Features
from ccat.step import Step, host_floats

CLIP = 1e-9  # train.py:54: np.clip(predictions, 1e-9, 1.0)


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """train.py:52-57: KL(p || uniform) in bits per sample, p = softmax(logits) in float32
    (train.py:70-71), then clipped to [1e-9, 1] and summed in float64 (the release's numpy)."""
    p = logits.float().softmax(1).double().clamp(CLIP, 1.0)
    return (p * torch.log2(p / (1.0 / logits.shape[1]))).sum(1)


def assign(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """train.py:76-81: 0 (the first modality, audio) where its KL to uniform is smaller, else
    1 (video, ties included), per sample, from each modality's head's logits."""
    return (kl_to_uniform(first) >= kl_to_uniform(second)).long()


def zeroed(feats: Features, keep: str) -> Features:
    """AVClassifier.forward's mode (models.py:55-59): every modality but ``keep`` zero; the
    kept modality's encoder alone runs, so the others are zeros of its shape."""
    z = feats[keep]
    return {m: z if m == keep else z._replace(tokens=torch.zeros_like(z.tokens),
                                              pooled=torch.zeros_like(z.pooled))
            for m in feats}


def cat_inputs(parts: list[torch.Tensor]) -> torch.Tensor:
    """Inputs of several batches as one: token ids (integer, B x L) padded with PAD_ID to the
    longest, as the loader's collate pads them; everything else stacked as it is."""
    if parts[0].dim() == 2 and not parts[0].is_floating_point():
        length = max(x.shape[1] for x in parts)
        parts = [F.pad(x, (0, length - x.shape[1]), value=PAD_ID) for x in parts]
    return torch.cat(parts)


class Queue:
    """One modality's samples waiting for a single-modality batch: keys, labels, split
    positions and that modality's inputs, in arrival order."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, batch: Batch, modality: str, pick: torch.Tensor) -> None:
        if len(pick):
            self.keys += [batch.keys[i] for i in pick.tolist()]
            self.parts.append((batch.label[pick], batch.index[pick],
                               batch.inputs[modality][pick]))

    def take(self, size: int, modality: str) -> Batch:
        """The first ``size`` samples as a batch with only ``modality``'s inputs."""
        label, index, inputs = (torch.cat([p[0] for p in self.parts]),
                                torch.cat([p[1] for p in self.parts]),
                                cat_inputs([p[2] for p in self.parts]))
        batch = Batch(self.keys[:size], label[:size], {modality: inputs[:size]}, index[:size])
        self.keys = self.keys[size:]
        self.parts = [(label[size:], index[size:], inputs[size:])] if self.keys else []
        return batch


@METHODS.register("remix")
class Remix(Method):
    fusion = "concat"  # AVClassifier's head: Linear(1024, C) over [a; v]

    @dataclass
    class Params:
        RANGES: ClassVar[dict[str, Range]] = {
            "warmup": NON_NEGATIVE, "alpha": Range(0, LARGE), "beta": Range(0, LARGE),
            "gamma1": Range(0, LARGE), "gamma2": Range(0, LARGE)}
        warmup: int = 10  # train.py:36, run_train.sh: --warmup 10 epochs of joint training
        alpha: float = 0.5  # train.py:43: the audio head's CE in warm-up
        beta: float = 0.5  # train.py:44: the video head's CE in warm-up
        gamma1: float = 1.0  # train.py:45: the video head's CE in a video batch
        gamma2: float = 1.0  # train.py:46: the audio head's CE in an audio batch

    def __init__(self, cfg: MethodConfig, epochs: int):
        super().__init__(cfg, epochs)
        self.assignment: torch.Tensor | None = None  # (N,) modality index per split position
        self.queues: dict[str, Queue] = {}  # this epoch's, made by its first batch
        self.size = 0  # the run's batch size, read off the epoch's first batch
        self.calls = 0  # train_step calls so far in this epoch
        self.last: dict[str, float] = {}  # each modality's latest single-modality loss

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int,
                    cfg: ModelConfig) -> MultimodalModel:
        """The concat head and a head per modality (models.py:34-36)."""
        require_two_modalities("remix", modalities, "it assigns each sample to audio or video")
        return build_model(modalities, num_classes, cfg, self.fusion, unimodal_heads=True)

    def remixing(self) -> bool:
        return self.epoch >= self.params.warmup  # train.py:243

    def on_epoch(self, epoch: int) -> None:
        self.calls = 0
        self.queues = {}

    @torch.no_grad()
    def before_epoch(self, model: MultimodalModel, data: RunData) -> None:
        """remix (train.py:60-99): each training sample's less confident modality, from an
        evaluation pass over the split (eval mode, no augmentation)."""
        if not self.remixing():
            self.assignment = None
            return
        if data.world > 1:
            raise CcatError("method 'remix' trains single-modality batches whose number "
                            "differs between ranks; run it without torchrun")
        model.eval()
        first, second = model.modalities
        assignment = torch.full((data.dataset.num_samples("train"),), -1, dtype=torch.long)
        for batch in data.batches("train", train=False):
            with data.autocast():
                feats = model.encode_all(batch.inputs)
                heads = {m: model.unimodal_heads[m](feats[m].pooled) for m in model.modalities}
            assignment[batch.index.cpu()] = assign(heads[first], heads[second]).cpu()
        if (assignment < 0).any():
            raise RuntimeError("remix's assignment pass missed samples of the training split")
        self.assignment = assignment

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        if not self.remixing():
            return self.warmup_step(model, batch, step)
        if self.assignment is None or batch.index is None or self.batches_per_epoch == 0:
            raise RuntimeError("remix trains by the assignment of before_epoch() and the "
                               "epoch's batch count of bind_data(), with Batch.index set")
        self.calls += 1
        if not self.queues:
            self.size, self.queues = len(batch.keys), {m: Queue() for m in model.modalities}
        size = self.size
        assigned = self.assignment.to(batch.index.device)[batch.index]
        order = list(reversed(model.modalities))  # video first (train.py:135-171)
        for m in order:
            self.queues[m].add(batch, m, (assigned == model.modalities.index(m)).nonzero()[:, 0])
        last = self.calls >= self.batches_per_epoch  # the epoch's last batch: flush both
        updates = {m: 0 for m in model.modalities}
        for m in order:
            while len(self.queues[m]) >= size or (last and len(self.queues[m])):
                self.last[m] = self.update(model, self.queues[m].take(size, m), m, step)
                updates[m] += 1
        out = {f"updates/{m}": float(n) for m, n in updates.items()}
        out.update({f"loss/{m}": v for m, v in self.last.items()})
        return out

    def update(self, model: MultimodalModel, batch: Batch, modality: str, step: Step) -> float:
        """special_train_epoch (train.py:139-169): one batch of ``modality`` alone, the other
        modality's features zero: CE(fused) + gamma CE(own head)."""
        gamma = self.params.gamma2 if modality == model.modalities[0] else self.params.gamma1
        step.zero_grad()
        z = model.encode(batch.inputs, modality)
        fused = model.fused_logits(zeroed({m: z for m in model.modalities}, modality))
        own = model.unimodal_heads[modality](z.pooled)
        loss = F.cross_entropy(fused, batch.label) + gamma * F.cross_entropy(own, batch.label)
        step.backward(loss)
        step.step()
        return loss.item()

    def warmup_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        """train_epoch (train.py:109-122): CE(fused) + alpha CE(audio head) + beta CE(video
        head)."""
        step.zero_grad()
        feats = model.encode_all(batch.inputs)
        fused = F.cross_entropy(model.fused_logits(feats), batch.label)
        weights = dict(zip(model.modalities, (self.params.alpha, self.params.beta)))
        own = {m: F.cross_entropy(model.unimodal_heads[m](feats[m].pooled), batch.label)
               for m in model.modalities}
        loss = fused + sum(weights[m] * own[m] for m in model.modalities)
        step.backward(loss)
        step.step()
        return host_floats({"loss": loss, "ce": fused, **{f"loss/{m}": v for m, v in own.items()}})

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """The concat head's logits, and each modality's own head (the heads remix reads)."""
        return predict_outputs(model, model.encode_all(batch.inputs),
                               lambda m, z: model.unimodal_heads[m](z))
