"""CCAT: Classifier-Constrained Alternating Training.

Stage 1 (pretrain): BiCross fusion and the shared classifier, trained on CE plus a
contribution-balance term (Eq. 7-8). Stage 2 (alternate): the classifier frozen, each
modality's encoder and LoRA trained in turn through it, then secondary updates for the
samples where a modality contributes less than beta (Algorithm 1, Eq. 12).
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ccat.config import ModelConfig
from ccat.contribution import contributions
from ccat.data.pipeline import Batch
from ccat.methods.base import METHODS, Method, Outputs, Stage, fuse_decisions
from ccat.models import MultimodalModel, build_model
from ccat.step import Step


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


@METHODS.register("ccat")
class CCAT(Method):
    fusion = "bicross"

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int,
                    cfg: ModelConfig) -> MultimodalModel:
        """BiCross fusion, the shared classifier and one LoRA per modality (rank r)."""
        return build_model(modalities, num_classes, cfg, self.fusion,
                           self.cfg.rank if self.cfg.lora else 0)

    def stages(self) -> list[Stage]:
        return [Stage("pretrain", self.cfg.pretrain_epochs or self.epochs),
                Stage("alternate", self.epochs)]

    def begin_stage(self, stage: Stage, model: MultimodalModel) -> None:
        self.stage = stage
        if stage.name == "pretrain":
            model.lora.requires_grad_(False)
            return
        if self.cfg.fresh_encoders:  # Algorithm 1, line 4: stage 2 starts from fresh encoders
            for encoder in model.encoders.values():
                encoder.reset()
        model.fusion.requires_grad_(False)  # unused in stage 2
        model.classifier.requires_grad_(not self.cfg.fixed_classifier)
        model.lora.requires_grad_(True)

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        if self.stage.name == "pretrain":
            return self._pretrain_step(model, batch, step)
        return self._alternate_step(model, batch, step)

    def _pretrain_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        feats = model.encode_all(batch.inputs)
        fused = model.fusion(feats)
        ce = F.cross_entropy(model.classifier(fused), batch.label)
        shares = contributions({m: feats[m][1] for m in model.modalities}, fused,
                               self.cfg.temperature)  # Eq. 5-6
        # Eq. 8 for two modalities; with more, the mean over modality pairs.
        reg = torch.stack([(shares[a] - shares[b]).abs().mean()
                           for a, b in itertools.combinations(model.modalities, 2)]).mean()
        loss = ce + self.cfg.lambda_reg * reg  # Eq. 7
        step.zero_grad()
        step.backward(loss)
        step.step()
        out = {"loss": loss.item(), "ce": ce.item(), "reg": reg.item()}
        out.update({f"contrib/{m}": c.mean().item() for m, c in shares.items()})
        return out

    def _unimodal(self, model: MultimodalModel, batch: Batch, modality: str) -> torch.Tensor:
        """Cls(z^m) + LoRA_m(z^m) (LoRA off in the ablation)."""
        z = model.encode(batch.inputs, modality)[1]
        return model.unimodal_logits(modality, z, lora=self.cfg.lora)

    def _alternate_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.cfg.alternating:
            for m in model.modalities:  # Algorithm 1: each modality in turn through the fixed Cls
                step.zero_grad()
                loss = F.cross_entropy(self._unimodal(model, batch, m), batch.label)
                step.backward(loss)
                step.step()
                out[f"loss/{m}"] = loss.item()
        else:  # Table 2 ablation: all modalities updated jointly on the fused prediction.
            # (A sum of per-modality losses would be the same update as alternating: each
            # loss reaches only its own encoder and LoRA through the fixed classifier.)
            step.zero_grad()
            logits = {m: self._unimodal(model, batch, m) for m in model.modalities}
            loss = F.cross_entropy(fuse_decisions(logits, self.cfg.fusion_rule), batch.label)
            step.backward(loss)
            step.step()
            out["loss"] = loss.item()
        if self.cfg.secondary:
            out.update(self._secondary_updates(model, batch, step))
        return out

    def _secondary_updates(self, model: MultimodalModel, batch: Batch,
                           step: Step) -> dict[str, float]:
        """Eq. 12: samples where c_i^m < beta get one more update of Enc_m and LoRA_m."""
        with torch.no_grad(), frozen_norm_stats(model):  # contributions of the models just updated
            logits = {m: self._unimodal(model, batch, m) for m in model.modalities}
            shares = contributions(logits, fuse_decisions(logits, self.cfg.fusion_rule),
                                   self.cfg.temperature)  # Eq. 5-6 at the decision level
        total = step.all_sum(len(batch.label))
        out = {f"contrib/{m}": c.mean().item() for m, c in shares.items()}
        for m in model.modalities:
            selected = shares[m] < self.cfg.beta
            count = step.all_sum(int(selected.sum()))
            out[f"selected/{m}"] = count / total
            if count == 0:  # every rank agrees, so none calls the collective
                continue
            step.zero_grad()
            picked = self._unimodal(model, batch, m)[selected]
            # Sum over this rank's picks, scaled so the rank average is the mean over all picks.
            loss = F.cross_entropy(picked, batch.label[selected], reduction="sum") * step.world / count
            step.backward(loss)
            step.step()
        return out

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """Stage 1: feature-level fusion; stage 2: unimodal logits fused at decision level."""
        feats = model.encode_all(batch.inputs)
        embeddings = {m: feats[m][1] for m in model.modalities}
        if self.stage.name == "pretrain":
            unimodal = {m: model.unimodal_logits(m, z) for m, z in embeddings.items()}
            fused = model.fusion(feats)
            return Outputs(fused=model.classifier(fused), unimodal=unimodal,
                           embeddings=embeddings, representation=fused)
        unimodal = {m: model.unimodal_logits(m, z, lora=self.cfg.lora)
                    for m, z in embeddings.items()}
        return Outputs(fused=fuse_decisions(unimodal, self.cfg.fusion_rule), unimodal=unimodal,
                       embeddings=embeddings,
                       representation=torch.cat(list(embeddings.values()), 1))
