"""QMF (Zhang et al., ICML 2023): Quality-aware Multimodal Fusion.

Decision-level fusion weighted per sample by each modality's energy-based confidence,
w^m = -s * Energy(x^m) = s * logsumexp(f^m(x^m)); trained on the fused CE plus every
unimodal CE plus a ranking term that asks each sample's confidence to rank inversely to
its historical loss (after Moon et al. 2020's correctness ranking loss). Each modality's
classifier f^m is its block of the concat head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ccat.config import NON_NEGATIVE, POSITIVE, ConfigError, MethodConfig, Range
from ccat.data.pipeline import Batch
from ccat.methods.base import METHODS, Method, Outputs, predict_outputs
from ccat.methods.zeroing import zeroed_unimodal
from ccat.models import MultimodalModel
from ccat.models.fusion import Features
from ccat.step import Step


def confidence(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """w = -scale * Energy = scale * log sum_k exp(f_k): the negative free energy (T = 1)."""
    return scale * torch.logsumexp(logits.float(), dim=1)


def ranking_loss(conf: torch.Tensor, loss_history: torch.Tensor) -> torch.Tensor:
    """mean_i max(0, g(l_i, l_j) (w_i - w_j) + |l_i - l_j|), j = i + 1 (mod B).

    ``loss_history`` holds each sample's historical loss normalized to [0, 1]; g is +1 when
    sample i's history is worse, -1 when better, 0 on ties. Zero once every pair's
    confidences are ordered inversely to their histories by at least the history gap.
    The released code adds the gap instead of subtracting it (a looser hinge).
    """
    gap = loss_history - loss_history.roll(-1)
    return F.relu(torch.sign(gap) * (conf - conf.roll(-1)) + gap.abs()).mean()


HISTORY_NORMS = ("released", "seen")


def normalized(history: dict[str, float], keys: list[str], total: int = 0) -> torch.Tensor:
    """The cumulative losses of ``keys``, min-max normalized over the whole history.

    With ``total`` training samples of which fewer have been seen, the unseen ones count
    as 0 (the released ``History``, an ``np.zeros(n_data)`` array, normalizes over all of
    them); ``total`` 0 normalizes over the seen samples only.
    """
    low, high = min(history.values()), max(history.values())
    if len(history) < total:
        low, high = min(low, 0.0), max(high, 0.0)
    values = torch.tensor([history[k] for k in keys], dtype=torch.float32)
    return (values - low) / max(high - low, 1e-12)


@METHODS.register("qmf")
class QMF(Method):
    fusion = "concat"

    @dataclass
    class Params:
        RANGES: ClassVar[dict[str, Range]] = {"lambda_rank": NON_NEGATIVE,
                                              "confidence_scale": POSITIVE}
        # Released code (QingyangZhang/QMF): --lamb 0.1 (RGBD train_QMF_*.py; the
        # text-image script adds the ranking term with weight 1); w = -0.1 * energy.
        lambda_rank: float = 0.1
        confidence_scale: float = 0.1
        # Min-max normalization of the loss history: "released" over every training sample,
        # unseen ones as 0 (the released History); "seen" over the samples seen so far.
        # They differ only until every training sample has been seen (about one epoch).
        history_norm: str = "released"

    def __init__(self, cfg: MethodConfig, epochs: int):
        super().__init__(cfg, epochs)
        if self.params.history_norm not in HISTORY_NORMS:
            raise ConfigError(f"method.params.history_norm must be one of "
                              f"{', '.join(HISTORY_NORMS)}, not {self.params.history_norm!r}")
        # modality -> sample key -> cumulative per-sample CE of that modality's head
        self.history: dict[str, dict[str, float]] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {m: dict(h) for m, h in state.get("history", {}).items()}

    def _total(self) -> int:
        """The sample count the history is normalized over (0: the seen samples)."""
        if self.params.history_norm == "seen":
            return 0
        if self.train_samples == 0:
            raise RuntimeError("QMF's released history normalization needs the training set's "
                               "size: call bind_data() before train_step()")
        return self.train_samples

    def decide(self, model: MultimodalModel,
               feats: Features) -> tuple[torch.Tensor, dict[str, torch.Tensor],
                                         dict[str, torch.Tensor]]:
        """Fused logits sum_m w^m f^m, the unimodal logits f^m and the confidences w^m.

        The weights enter the fusion detached, as in the released text-image code.
        """
        logits = {m: model.unimodal_logits(m, feats[m].pooled) for m in model.modalities}
        conf = {m: confidence(v, self.params.confidence_scale) for m, v in logits.items()}
        fused = torch.stack([conf[m].detach()[:, None] * logits[m] for m in logits]).sum(0)
        return fused, logits, conf

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        step.zero_grad()
        fused, logits, conf = self.decide(model, model.encode_all(batch.inputs))
        ce = F.cross_entropy(fused, batch.label)
        unimodal, rank = {}, {}
        for m, v in logits.items():
            per_sample = F.cross_entropy(v, batch.label, reduction="none")
            unimodal[m] = per_sample.mean()
            history = self.history.setdefault(m, {})
            for key, value in zip(batch.keys, per_sample.detach().float().tolist()):
                history[key] = history.get(key, 0.0) + value
            rank[m] = ranking_loss(conf[m], normalized(history, batch.keys, self._total())
                                   .to(conf[m].device))
        reg = torch.stack(list(rank.values())).sum()
        loss = ce + torch.stack(list(unimodal.values())).sum() + self.params.lambda_rank * reg
        step.backward(loss)
        step.step()
        out = {"loss": loss.item(), "ce": ce.item(), "rank": reg.item()}
        out.update({f"loss/{m}": v.item() for m, v in unimodal.items()})
        out.update({f"conf/{m}": c.mean().item() for m, c in conf.items()})
        return out

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """Confidence-weighted fusion; each modality's with the other zeroed (Sec. 4.1)."""
        feats = model.encode_all(batch.inputs)
        return predict_outputs(model, feats,
                               zeroed_unimodal(feats, lambda f: self.decide(model, f)[0]),
                               lambda _: self.decide(model, feats)[0])
