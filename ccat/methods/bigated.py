"""BiGated baseline (Table 1): joint training on the fused CE with gated fusion.

f = sigmoid(h^x) * h^y + sigmoid(h^y) * h^x (Kiela et al. 2018's gate, as in OGM-GE's
GatedFusion, applied in both directions); the fusion is ``ccat.models.fusion.BiGated``.
"""

from __future__ import annotations

from ccat.methods.base import METHODS
from ccat.methods.joint import PairFusionMethod


@METHODS.register("bigated")
class BiGated(PairFusionMethod):
    fusion = "bigated"
