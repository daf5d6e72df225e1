"""FiLM baseline (Table 1): joint training on the fused CE with FiLM fusion.

f = gamma(z^x) * z^y + beta(z^x) (Perez et al. 2018, Eq. 1-3 there), as OGM-GE's code
uses it; the fusion is ``ccat.models.fusion.FiLM``.
"""

from __future__ import annotations

from ccat.methods.base import METHODS
from ccat.methods.joint import PairFusionMethod


@METHODS.register("film")
class FiLM(PairFusionMethod):
    fusion = "film"
