"""Per-sample modality contributions (Eq. 5-6), used by both CCAT stages and evaluation.

For modality m and sample i, the InfoNCE estimate of MI(z_i^m, f_i) over the batch is

    I_i^m = log N + log( exp(<f_i, z_i^m> / T) / sum_j exp(<f_i, z_j^m> / T) )   # Eq. 5

and c_i = softmax over modalities of I_i^m (Eq. 6). The paper does not say whether <., .>
is taken on normalised vectors: ``similarity="cosine"`` (L2-normalised, our literal
reading and the default) or ``"dot"`` (the raw dot product).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SIMILARITIES = ("cosine", "dot")


def contributions(parts: dict[str, torch.Tensor], fused: torch.Tensor,
                  temperature: float = 1.0, similarity: str = "cosine") -> dict[str, torch.Tensor]:
    """Contribution c_i^m of each modality to each sample's fused representation.

    ``parts`` maps modality -> (N, D) features (stage 1: pooled z^m; stage 2: logits),
    ``fused`` is (N, D) (stage 1: BiCross output; stage 2: decision-level fused logits).
    ``temperature`` divides the similarities; 1 is the paper as written. ``similarity``
    is "cosine" or "dot" (module docstring). Returns modality -> (N,) contributions that
    sum to 1 over modalities.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, not {similarity!r}")
    unit = similarity == "cosine"
    f = F.normalize(fused, dim=-1) if unit else fused
    scores = []
    for z in parts.values():
        z = F.normalize(z, dim=-1) if unit else z
        sim = f @ z.t() / temperature  # (N, N): <f_i, z_j^m> / T
        scores.append(math.log(len(f)) + sim.diag() - torch.logsumexp(sim, dim=1))  # Eq. 5
    shares = torch.softmax(torch.stack(scores, dim=1), dim=1)  # Eq. 6
    return {m: shares[:, k] for k, m in enumerate(parts)}


@dataclass(frozen=True)
class Estimator:
    """How contributions are measured: Eq. 5's temperature and similarity. Evaluation
    measures every method with its method's (:attr:`ccat.methods.base.Method.estimator`)."""

    temperature: float = 1.0  # the paper as written
    similarity: str = "cosine"

    def __call__(self, parts: dict[str, torch.Tensor],
                 fused: torch.Tensor) -> dict[str, torch.Tensor]:
        return contributions(parts, fused, self.temperature, self.similarity)
