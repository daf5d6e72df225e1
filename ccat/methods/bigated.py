"""BiGated baseline (Table 1): joint training on the fused CE with gated fusion.

f = sigmoid(h^x) * h^y + sigmoid(h^y) * h^x (Kiela et al. 2018's gate, as in OGM-GE's
GatedFusion, applied in both directions); the fusion is ``ccat.models.fusion.BiGated``.
"""

from __future__ import annotations

from ccat.data.pipeline import Batch
from ccat.methods.base import METHODS, Outputs
from ccat.methods.joint import JointMethod
from ccat.methods.zeroing import feature_fusion_outputs
from ccat.models import MultimodalModel


@METHODS.register("bigated")
class BiGated(JointMethod):
    fusion = "bigated"

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """Fused logits; each modality's with the other zeroed before fusion (Sec. 4.1)."""
        return feature_fusion_outputs(model, batch)
