"""Models: encoders, fusions, the shared classifier with per-modality LoRA."""

from ccat.models.encoders import ENCODERS, build_encoder
from ccat.models.fusion import FUSIONS
from ccat.models.model import LoRA, MultimodalModel, build_model

__all__ = ["ENCODERS", "FUSIONS", "LoRA", "MultimodalModel", "build_encoder", "build_model"]
