"""CCAT: Classifier-Constrained Alternating Training.

Stage 1 (pretrain): BiCross fusion and the shared classifier, trained on CE plus a
contribution-balance term (Eq. 7-8). Stage 2 (alternate): the classifier frozen, each
modality's encoder and LoRA trained in turn through it, then secondary updates for the
samples where a modality contributes less than beta (Algorithm 1, Eq. 12).

Where the paper leaves a choice open, the default is one named reading and the others are
``method.params`` options: the budget (``budget``, ``pretrain_fraction``), the secondary
update's optimizer (``secondary_optimizer``) and forward pass (``secondary_forward``), the
estimator's similarity (``similarity``), stage 2's encoders (``fresh_encoders``) and the
LoRA scale (``lora_alpha``, ``lora_scale``); :class:`CCATParams` says what each one means.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, Iterator, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ccat.config import (FRACTION, NON_NEGATIVE, POSITIVE, WIDTH, MethodConfig, ModelConfig,
                         Range)
from ccat.contribution import Estimator, contributions
from ccat.data.pipeline import Batch
from ccat.methods.base import (METHODS, Method, Outputs, Stage, fuse_decisions, predict_outputs,
                              split_budget)
from ccat.models import MultimodalModel, build_model
from ccat.step import Step, host_floats
from ccat.ui import make_console

MIN_SUBSET = 2  # batch norm needs two samples for batch statistics
warn_console = make_console(stderr=True)


@contextlib.contextmanager
def frozen_norm_stats(model: nn.Module) -> Iterator[None]:
    """Batch norm in train mode (batch statistics) whose running statistics stay as they
    are: a measuring pass must not change the model, or switching secondary updates off
    would change training even when no sample is selected."""
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


@dataclass
class CCATParams:
    """CCAT's hyperparameters (Table 1's for CREMA-D) and its named readings."""

    RANGES: ClassVar[dict[str, Range]] = {
        "lambda_reg": NON_NEGATIVE, "rank": WIDTH, "beta": FRACTION,
        "temperature": POSITIVE, "pretrain_epochs": NON_NEGATIVE,
        "pretrain_fraction": Range(0, 1, low_open=True, high_open=True),
        "lora_alpha": POSITIVE}
    lambda_reg: float = 0.001  # Eq. 8 weight of the contribution-balance term
    rank: int = 2  # LoRA rank r
    beta: float = 0.15  # contribution threshold for secondary updates (Eq. 12)
    temperature: float = 1.0  # of the contribution estimator; 1 = the paper as written
    # Eq. 5's <f, z>: "cosine" (L2-normalised vectors, our literal reading) or "dot" (raw).
    similarity: Literal["cosine", "dot"] = "cosine"
    # "total": stage 1 + stage 2 = optim.epochs (the paper's "150 total epochs"); "per_stage":
    # each stage gets optim.epochs (stage 1: pretrain_epochs if set), twice a baseline's budget.
    budget: Literal["total", "per_stage"] = "total"
    pretrain_epochs: int = 0  # stage 1 epochs; 0 = pretrain_fraction of the total budget
    pretrain_fraction: float = 0.5  # stage 1's share of optim.epochs (budget total), in (0, 1)
    # Stage 2 re-initializes the encoders: our reading of Algorithm 1 line 4, "initialize
    # {Enc_m}"; false keeps stage 1's encoders (the other reading).
    fresh_encoders: bool = True
    # The secondary update's optimizer: "shared" (the primary SGD, its momentum re-applied)
    # or "plain" (a momentum-free SGD step at the same learning rate and weight decay).
    secondary_optimizer: Literal["shared", "plain"] = "shared"
    # The secondary pass forwards the "batch" (batch norm sees all B) or only the "subset"
    # of selected samples (batch norm sees those; needs at least 2).
    secondary_forward: Literal["batch", "subset"] = "batch"
    lora_alpha: float = 1.0  # LoRA's alpha (Eq. 9 has no scale: alpha 1)
    # "alpha" (Eq. 9: B A z * alpha) or "alpha_over_rank" (Hu et al.)
    lora_scale: Literal["alpha", "alpha_over_rank"] = "alpha"
    fixed_classifier: bool = True  # Table 2 ablation switches
    alternating: bool = True  # false: all modalities at once on the fused decision's CE
    secondary: bool = True
    lora: bool = True
    fusion_rule: Literal["mean", "sum"] = "mean"  # decision-level fusion at inference


def stage_epochs(cfg: CCATParams, epochs: int) -> tuple[int, int]:
    """Epochs of stage 1 and stage 2 for ``optim.epochs`` = ``epochs`` (the paper's "150
    total epochs" shared by default; :func:`split_budget`)."""
    return split_budget(epochs, cfg.budget, cfg.pretrain_epochs, cfg.pretrain_fraction,
                        "CCAT", "pretrain_epochs")


class Phase(Enum):
    """CCAT's stages, in order; each value is the name checkpoints and metrics rows record."""

    PRETRAIN = "pretrain"  # stage 1: BiCross fusion and the classifier, Eq. 7-8
    ALTERNATE = "alternate"  # stage 2: Algorithm 1 through the fixed classifier


@METHODS.register("ccat")
class CCAT(Method):
    fusion = "bicross"
    Params = CCATParams

    def __init__(self, cfg: MethodConfig, epochs: int):
        super().__init__(cfg, epochs)
        self.estimator = Estimator(self.params.temperature, self.params.similarity)
        self.selected_in_epoch: dict[str, float] = {}  # modality -> samples picked this epoch

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int,
                    cfg: ModelConfig) -> MultimodalModel:
        """BiCross fusion, the shared classifier and one LoRA per modality (rank r)."""
        return build_model(modalities, num_classes, cfg, self.fusion,
                           self.params.rank if self.params.lora else 0, self.params.lora_alpha,
                           self.params.lora_scale)

    def stages(self) -> list[Stage]:
        first, second = stage_epochs(self.params, self.epochs)
        return [Stage.of(Phase.PRETRAIN, first), Stage.of(Phase.ALTERNATE, second)]

    def on_epoch(self, epoch: int) -> None:
        self.selected_in_epoch = {}

    def on_stage(self, stage: Stage, model: MultimodalModel) -> None:
        if stage.kind is Phase.PRETRAIN:
            model.lora.requires_grad_(False)
            return
        # Our reading of Algorithm 1 line 4, "initialize {Enc_m}": fresh encoders for stage 2;
        # fresh_encoders=false (stage 1's encoders) is the other reading.
        if self.params.fresh_encoders:
            for encoder in model.encoders.values():
                encoder.reset()
        model.fusion.requires_grad_(False)  # unused in stage 2
        model.classifier.requires_grad_(not self.params.fixed_classifier)
        model.lora.requires_grad_(True)

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        if self.stage.kind is Phase.PRETRAIN:
            return self._pretrain_step(model, batch, step)
        return self._alternate_step(model, batch, step)

    def _pretrain_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        feats = model.encode_all(batch.inputs)
        fused = model.fusion(feats)
        ce = F.cross_entropy(model.classifier(fused), batch.label)
        shares = contributions({m: feats[m].pooled for m in model.modalities}, fused,
                               self.params.temperature, self.params.similarity)  # Eq. 5-6
        # Eq. 8 for two modalities; with more, the mean over modality pairs.
        reg = torch.stack([(shares[a] - shares[b]).abs().mean()
                           for a, b in itertools.combinations(model.modalities, 2)]).mean()
        loss = ce + self.params.lambda_reg * reg  # Eq. 7
        step.zero_grad()
        step.backward(loss)
        step.step()
        return host_floats({"loss": loss, "ce": ce, "reg": reg,
                            **{f"contrib/{m}": c.mean() for m, c in shares.items()}})

    def _unimodal(self, model: MultimodalModel, batch: Batch, modality: str) -> torch.Tensor:
        """Cls(z^m) + LoRA_m(z^m) (LoRA off in the ablation)."""
        z = model.encode(batch.inputs, modality).pooled
        return model.unimodal_logits(modality, z, lora=self.params.lora)

    def _alternate_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        out: dict[str, torch.Tensor | float] = {}  # fetched to the host once, at the end
        if self.params.alternating:
            for m in model.modalities:  # Algorithm 1: each modality in turn through the fixed Cls
                step.zero_grad()
                loss = F.cross_entropy(self._unimodal(model, batch, m), batch.label)
                step.backward(loss)
                step.step()
                out[f"loss/{m}"] = loss.detach()
        else:  # Table 2 ablation: all modalities updated jointly on the fused prediction.
            # (A sum of per-modality losses would be the same update as alternating: each
            # loss reaches only its own encoder and LoRA through the fixed classifier.)
            step.zero_grad()
            logits = {m: self._unimodal(model, batch, m) for m in model.modalities}
            loss = F.cross_entropy(fuse_decisions(logits, self.params.fusion_rule), batch.label)
            step.backward(loss)
            step.step()
            out["loss"] = loss.detach()
        if self.params.secondary:
            out.update(self._secondary_updates(model, batch, step))
        return host_floats(out)

    def _secondary_updates(self, model: MultimodalModel, batch: Batch,
                           step: Step) -> dict[str, float]:
        """Eq. 12: samples where c_i^m < beta get one more update of Enc_m and LoRA_m."""
        with torch.no_grad(), frozen_norm_stats(model):  # contributions of the models just updated
            logits = {m: self._unimodal(model, batch, m) for m in model.modalities}
            shares = contributions(logits, fuse_decisions(logits, self.params.fusion_rule),
                                   self.params.temperature, self.params.similarity)  # Eq. 5-6
        total = step.all_sum(len(batch.label))
        picks = {m: shares[m] < self.params.beta for m in model.modalities}
        fetched = host_floats({**{f"contrib/{m}": c.mean() for m, c in shares.items()},
                               **{m: selected.sum() for m, selected in picks.items()}})
        out = {f"contrib/{m}": fetched[f"contrib/{m}"] for m in shares}
        for m in model.modalities:
            selected, picked = picks[m], int(fetched[m])
            out[f"selected/{m}"] = step.all_sum(picked) / total
            self.selected_in_epoch[m] = self.selected_in_epoch.get(m, 0.0) + out[f"selected/{m}"]
            usable = (picked if self.params.secondary_forward == "batch" or picked >= MIN_SUBSET
                      else 0)
            count = step.all_sum(usable)
            if self.params.secondary_forward == "subset":
                out[f"updated/{m}"] = count / total  # picks that got the update (>= 2 per rank)
            if count == 0:  # every rank agrees, so none calls the collective
                continue
            step.zero_grad()
            # Sum over this rank's picks, scaled so the rank average is the mean over all picks.
            loss = self._picked_loss(model, batch, m, selected, usable) * step.world / count
            step.backward(loss)
            if self.params.secondary_optimizer == "shared":
                step.step()
            else:
                step.step(momentum=False)
        return out

    def _picked_loss(self, model: MultimodalModel, batch: Batch, modality: str,
                     selected: torch.Tensor, usable: int) -> torch.Tensor:
        """Summed CE of the selected samples. "batch": the whole batch is forwarded and the
        picks indexed (batch norm sees all B); "subset": only the picks are forwarded. A
        rank whose picks are unusable (fewer than 2 in subset mode) adds a zero loss over
        the same parameters, so every rank reduces the same gradients."""
        if self.params.secondary_forward == "batch":
            logits = self._unimodal(model, batch, modality)
            return F.cross_entropy(logits[selected], batch.label[selected], reduction="sum")
        if usable == 0:
            with frozen_norm_stats(model):
                return self._unimodal(model, batch, modality).sum() * 0.0
        subset = Batch([k for k, s in zip(batch.keys, selected.tolist()) if s],
                       batch.label[selected], {m: x[selected] for m, x in batch.inputs.items()})
        return F.cross_entropy(self._unimodal(model, subset, modality), subset.label,
                               reduction="sum")

    def end_epoch(self) -> None:
        """One line per modality whose secondary update selected no sample in the whole
        epoch (with the literal estimator this is the usual case), on rank 0."""
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        for m, selected in self.selected_in_epoch.items():  # empty without secondary updates
            if selected == 0.0:
                warn_console.print(
                    f"warning: epoch {self.epoch + 1}: the secondary update selected no {m} "
                    f"sample (no contribution below beta={self.params.beta}); try "
                    f"method.params.similarity=dot or a lower method.params.temperature")

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """Stage 1: feature-level fusion; stage 2: unimodal logits fused at decision level."""
        feats = model.encode_all(batch.inputs)
        if self.stage.kind is Phase.PRETRAIN:
            return predict_outputs(model, feats, model.unimodal_logits)
        return predict_outputs(model, feats,
                               lambda m, z: model.unimodal_logits(m, z, lora=self.params.lora),
                               lambda unimodal: fuse_decisions(unimodal, self.params.fusion_rule))
