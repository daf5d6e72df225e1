"""FiLM baseline (Table 1): joint training on the fused CE with FiLM fusion.

f = gamma(z^x) * z^y + beta(z^x) (Perez et al. 2018, Eq. 1-3 there), as OGM-GE's code
uses it; the fusion is ``ccat.models.fusion.FiLM``.
"""

from __future__ import annotations

from ccat.data.pipeline import Batch
from ccat.methods.base import METHODS, Outputs
from ccat.methods.joint import JointMethod
from ccat.methods.zeroing import feature_fusion_outputs
from ccat.models import MultimodalModel


@METHODS.register("film")
class FiLM(JointMethod):
    fusion = "film"

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """Fused logits; each modality's with the other zeroed before fusion (Sec. 4.1)."""
        return feature_fusion_outputs(model, batch)
