"""Gradient-Blending (Wang, Tran and Feiszli, CVPR 2020): "What makes training multi-modal
classification networks hard?", online G-Blend (Sec. 3.3).

Concat fusion trained on a blend of losses, one per output k: each modality's own head (its
block of the concat head, with 1/M of the bias) and the fused head,
loss = sum_k w_k CE_k. The weights follow each output's overfitting-to-generalization
behaviour, w_k proportional to |dG_k / dO_k^2|, and are re-estimated every ``super_epoch``
epochs: for each output k, a copy of the current model with a fresh optimizer trains for
``super_epoch`` epochs on output k alone (for a modality: the fused head with the other
modalities zeroed); with T_j its training loss during copy epoch j and V_j its held-out loss
after it, dG_k = V_last - V_first and dO_k = (V_last - T_last) - (V_first - T_first), and the
weights are normalized to sum to 1. The paper's text was not at hand to check its equation
numbers, so the code below cites the released lines.

Matched to GeWu-Lab/BalanceBenchmark at 4c1482f, balancemm/trainer/GBlending_trainer.py:
``fit`` L92-95 (an estimate when current_epoch % super_epoch == 0; ``offline`` sets
super_epoch to max_epochs, L30-31), ``super_epoch_origin`` L306-376 (per output a temp model
loaded with the model's state and the optimizer reset to its initial state; super_epoch
training epochs, the training loss summed over the epoch's batches, the validation loss
summed over the val loader's batches after epochs 0 and super_epoch - 1, in eval mode; the
weights L361-373) and ``training_step`` L292-303 (sum of w_k CE_k over the modalities and the
output); balancemm/train.py L82-88 (the temp optimizer: the run's optimizer type and
settings, fresh); configs/trainer_config.yaml L34-39 (online, super_epoch 10: the defaults
here; its modulation_starts / modulation_ends are never read by the trainer, so are no
params); balancemm/models/avclassify_model.py L256-301 (``padding`` zeroes the other
modalities, the unimodal outputs are the concat head's blocks plus bias / M).

Held-out data: the run's validation split (``data.val_split``, the one that picks best.pt),
as BalanceBenchmark reads its val loader (the dataset's validation split where it has one).
The paper holds out part of the training set instead; the shards have no such split and
carving one would change what the run trains on, so it is not offered. A dataset without
the validation split is refused.

Departures from the released code:

- The other modalities are zeroed at their encoders' output (``zeroing.py``'s rule), not at
  the input: released padding feeds zeros to the other encoder, whose output is then a
  constant the head adds, as the learnt bias does here; zero features mean "absent" for every
  kind (zero text ids do not), and no gradient runs through the zeroed encoder.
- The copy's epochs stream the batches of the run's next ``super_epoch`` epochs (seeded by
  the run's seed and epoch; the released loader draws new shuffles), and its random draws are
  made under a forked RNG, so the run's own stream is untouched and ``--resume`` repeats the
  estimate exactly.
- The copy is a fresh, uncompiled build of the model loaded with its state (as the released
  temp_model.load_state_dict), trained in the loop's precision.
- A degenerate estimate (dO_k = 0 for some k, or every dG_k = 0, where the released code
  divides by zero) keeps the previous weights and logs ``weights_kept`` = 1.
- Before the first estimate the weights are uniform; a run never trains with them, since
  epoch 0 starts with an estimate.
- ``losses: mean`` is the paper's reading, per-sample mean losses; the default ``summed`` is
  the released sum over batches of the batch-mean loss (so T weighs by the training batches,
  V by the validation batches).
- Under torchrun the copies' gradients are averaged over ranks by their Step and the loss
  sums are summed over ranks, so every rank blends with the same weights.

Unimodal accuracy: each modality's own head, its block of the concat head with 1/M of the
bias (the decision-level reading: G-Blending trains a head per modality; the released
``unimodal_result`` is that block).

Cost: each step as Concat's (one forward and backward; the unimodal logits are slices of
the head). Every ``super_epoch`` epochs (once at epoch 0 with ``offline``): for each of the
M + 1 outputs, ``super_epoch`` training epochs of a copy (every encoder forward, the backward
through the kept one and the head) and 2 evaluations of the validation split. CREMA-D's
defaults, M = 2 and super_epoch = 10: 30 extra training epochs and 6 evaluations per 10
epochs, about 4x Concat's training compute, and one more model in memory while it runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from ccat.config import LARGE, ConfigError, MethodConfig, ModelConfig, Range
from ccat.data.pipeline import Batch
from ccat.errors import CcatError
from ccat.methods.base import METHODS, RunData
from ccat.methods.joint import JointMethod
from ccat.methods.zeroing import without_others
from ccat.models import MultimodalModel
from ccat.step import NonFiniteLoss, Step, host_floats

FUSED = "fused"  # the fused head's output (released: 'output')


@dataclass(frozen=True)
class Measured:
    """One copy's losses after its first (``pre``) and last (``now``) training epoch."""

    pre_train: float
    pre_val: float
    now_train: float
    now_val: float


def blend(measured: dict[str, Measured]) -> dict[str, float] | None:
    """w_k = |dG_k / dO_k^2| / sum_j |dG_j / dO_j^2| (GBlending_trainer.py L361-373);
    None where the released code divides by zero (some dO_k^2 = 0, or every dG_k = 0)."""
    raw = {}
    for k, m in measured.items():
        gain = m.now_val - m.pre_val  # L361: dG (its sign is lost to the abs)
        overfit = (m.now_val - m.now_train) - (m.pre_val - m.pre_train)  # L362-364: dO
        if overfit ** 2 == 0:
            return None
        raw[k] = abs(gain / overfit ** 2)  # L366
    total = sum(raw.values())
    if total == 0 or not math.isfinite(total):
        return None
    return {k: w / total for k, w in raw.items()}  # L368-372


def copy_logits(model: MultimodalModel, inputs: dict[str, torch.Tensor],
                keep: str | None) -> torch.Tensor:
    """The fused head's logits, with every modality but ``keep`` zeroed (None: all kept)."""
    feats = model.encode_all(inputs)
    return model.fused_logits(feats if keep is None else without_others(feats, keep))


class LossTally:
    """One pass's losses, summed on the device: the batch means (the released ``_loss``)
    and the per-sample losses with their count (the paper's mean)."""

    def __init__(self) -> None:
        self.batch_means: torch.Tensor | float = 0.0
        self.samples: torch.Tensor | float = 0.0
        self.count = 0

    def add(self, mean_loss: torch.Tensor, size: int) -> None:
        mean_loss = mean_loss.detach().float()
        self.batch_means = self.batch_means + mean_loss
        self.samples = self.samples + mean_loss * size
        self.count += size

    def value(self, losses: str, step: Step) -> float:
        """``summed``: the sum of batch means; ``mean``: the mean loss per sample; each
        summed over ranks."""
        if losses == "summed":
            return step.all_sum(float(self.batch_means))
        return step.all_sum(float(self.samples)) / step.all_sum(self.count)


@METHODS.register("gblending")
class GBlending(JointMethod):
    fusion = "concat"  # BalanceBenchmark's BaseClassifier: concat fusion

    @dataclass
    class Params:
        RANGES: ClassVar[dict[str, Range]] = {"super_epoch": Range(2, LARGE)}
        # trainer_config.yaml L34-39: method online, super_epoch 10. At least 2: the
        # released first and last epoch must differ (with 1 both are epoch 0).
        super_epoch: int = 10
        # offline: one estimate at epoch 0, its copies trained for all optim.epochs (L30-31).
        mode: Literal["online", "offline"] = "online"
        # summed: the released sums over batches of the batch-mean loss; mean: the paper's
        # per-sample mean losses.
        losses: Literal["summed", "mean"] = "summed"

    def __init__(self, cfg: MethodConfig, epochs: int):
        super().__init__(cfg, epochs)
        if self.params.mode == "offline" and epochs < 2:
            raise ConfigError(f"method.params.mode offline trains its copies for optim.epochs "
                              f"epochs, which must be at least 2, not {epochs}")
        self.weights: dict[str, float] = {}  # output -> w_k; empty before the first estimate
        self.kept = False  # whether the last estimate was degenerate and the weights kept
        self.built: tuple[dict[str, dict[str, Any]], int, ModelConfig] | None = None

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int,
                    cfg: ModelConfig) -> MultimodalModel:
        self.built = (modalities, num_classes, cfg)  # what the copies are built from
        return super().build_model(modalities, num_classes, cfg)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": dict(self.weights), "kept": self.kept}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights = {k: float(w) for k, w in state.get("weights", {}).items()}
        self.kept = bool(state.get("kept", False))

    def super_epoch(self) -> int:
        return self.epochs if self.params.mode == "offline" else self.params.super_epoch

    def current_weights(self, modalities: list[str]) -> dict[str, float]:
        """The estimated w_k, uniform before the first estimate."""
        outputs = [*modalities, FUSED]
        return self.weights or {k: 1 / len(outputs) for k in outputs}

    def before_epoch(self, model: MultimodalModel, data: RunData) -> None:
        """Re-estimate the weights at every super-epoch's start (L92-95)."""
        if self.epoch % self.super_epoch():
            return
        split = data.cfg.val_split
        if split not in data.dataset.splits or data.dataset.num_samples(split) == 0:
            raise CcatError(f"gblending estimates its weights on the validation split "
                            f"{split!r}, which {data.dataset.root} lacks; build the shards "
                            f"with one or set data.val_split to a split it has")
        devices = [data.device] if data.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            measured = {k: self.measure(model, data, None if k == FUSED else k)
                        for k in [*model.modalities, FUSED]}
        weights = blend(measured)
        self.kept = weights is None
        if weights is not None:
            self.weights = weights

    def fresh_copy(self, model: MultimodalModel, device: torch.device) -> MultimodalModel:
        """A new model like ``model``, loaded with its state (L307, L313)."""
        if self.built is None:
            raise RuntimeError("G-Blending copies the model it built: call build_model() first")
        copy = super().build_model(*self.built)
        copy.load_state_dict(model.state_dict())
        return copy.to(device)

    def measure(self, model: MultimodalModel, data: RunData, keep: str | None) -> Measured:
        """Train a copy on output ``keep`` (None: the fused one) for a super-epoch; its
        training and validation losses after the first and the last epoch (L312-360)."""
        if data.new_step is None:
            raise RuntimeError("G-Blending trains a copy of the model: RunData.new_step is unset")
        copy = self.fresh_copy(model, data.device)
        step = data.new_step(copy)  # the run's optimizer, fresh (L314)
        last = self.super_epoch() - 1
        losses = {}
        for j in range(last + 1):
            copy.train()
            train = self.train_copy(copy, data, step, keep, self.epoch + j)
            if j in (0, last):
                copy.eval()
                losses[j] = (train, self.validation_loss(copy, data, step, keep))
        (pre_train, pre_val), (now_train, now_val) = losses[0], losses[last]
        return Measured(pre_train, pre_val, now_train, now_val)

    def train_copy(self, copy: MultimodalModel, data: RunData, step: Step, keep: str | None,
                   epoch: int) -> float:
        """One training epoch of the copy on output ``keep``; its summed loss (L334-341)."""
        tally = LossTally()
        for batch in data.batches("train", train=True, epoch=epoch):
            step.zero_grad()
            with data.autocast():
                loss = F.cross_entropy(copy_logits(copy, batch.inputs, keep), batch.label)
                step.backward(loss)
            try:
                step.step()
            except NonFiniteLoss:
                raise CcatError(f"non-finite loss while G-Blending's copy trained on output "
                                f"{keep or FUSED!r} at epoch {self.epoch + 1}; lower optim.lr"
                                ) from None
            tally.add(loss, len(batch.keys))
        return tally.value(self.params.losses, step)

    @torch.no_grad()
    def validation_loss(self, copy: MultimodalModel, data: RunData, step: Step,
                        keep: str | None) -> float:
        """The copy's summed loss on output ``keep`` over the validation split (L342-350)."""
        tally = LossTally()
        for batch in data.batches(data.cfg.val_split, train=False):
            with data.autocast():
                tally.add(F.cross_entropy(copy_logits(copy, batch.inputs, keep), batch.label),
                          len(batch.keys))
        return tally.value(self.params.losses, step)

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        """loss = sum_k w_k CE_k over the modalities' heads and the fused one (L300-301)."""
        step.zero_grad()
        feats = model.encode_all(batch.inputs)
        logits = {m: model.unimodal_logits(m, feats[m].pooled) for m in model.modalities}
        logits[FUSED] = model.fused_logits(feats)
        weights = self.current_weights(model.modalities)
        losses = {k: F.cross_entropy(v, batch.label) for k, v in logits.items()}
        loss = torch.stack([weights[k] * v for k, v in losses.items()]).sum()
        step.backward(loss)
        step.step()
        out = host_floats({"loss": loss, "ce": losses[FUSED],
                           **{f"loss/{m}": losses[m] for m in model.modalities}})
        out.update({f"weight/{k}": w for k, w in weights.items()})
        out["weights_kept"] = float(self.kept)
        return out
