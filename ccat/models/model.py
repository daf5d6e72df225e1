"""The shared classifier's per-modality LoRA adapter and the full multimodal model."""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
from torch import nn

from ccat.config import ConfigError, ModelConfig
from ccat.models.encoders import EncoderOutput, build_encoder
from ccat.models.fusion import FUSIONS, Features


LORA_SCALES = ("alpha", "alpha_over_rank")


class LoRA(nn.Module):
    """Low-rank update B A z of a linear layer's output, times a scale.

    ``scale="alpha_over_rank"`` is Hu et al.'s alpha / r; ``"alpha"`` is CCAT's Eq. 9, which
    prints no scale (alpha = 1). B starts at zero, so an adapter added at initialization
    leaves the logits unchanged.
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float = 1.0,
                 scale: str = "alpha_over_rank"):
        super().__init__()
        if scale not in LORA_SCALES:
            raise ConfigError(f"method.params.lora_scale must be one of {', '.join(LORA_SCALES)}, "
                              f"not {scale!r}")
        if not alpha > 0:
            raise ConfigError(f"method.params.lora_alpha must be > 0, not {alpha!r}")
        self.A = nn.Parameter(torch.empty(rank, in_dim))
        self.B = nn.Parameter(torch.zeros(out_dim, rank))
        self.scale = alpha / rank if scale == "alpha_over_rank" else alpha
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (z @ self.A.t() @ self.B.t()) * self.scale


class MultimodalModel(nn.Module):
    """Encoders per modality, a fusion, the classifier (one linear layer unless the fusion makes
    its own), optional LoRAs and optional unimodal heads (one linear layer per modality on
    its pooled z^m, apart from the classifier: MMPareto's unimodal losses)."""

    def __init__(self, encoders: dict[str, nn.Module], fusion: nn.Module, num_classes: int,
                 lora_rank: int = 0, lora_alpha: float = 1.0,
                 lora_scale: str = "alpha_over_rank", unimodal_heads: bool = False):
        super().__init__()
        self.modalities = list(encoders)
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        make_classifier = getattr(fusion, "make_classifier", None)  # e.g. the untied Sum's heads
        self.classifier = make_classifier(num_classes) if make_classifier is not None \
            else nn.Linear(fusion.out_dim, num_classes)
        in_dim = next(iter(encoders.values())).proj.out_features
        self.lora = nn.ModuleDict({m: LoRA(in_dim, num_classes, lora_rank, lora_alpha, lora_scale)
                                   for m in encoders} if lora_rank > 0 else {})
        self.unimodal_heads = nn.ModuleDict({m: nn.Linear(in_dim, num_classes) for m in encoders}
                                            if unimodal_heads else {})

    def encode(self, inputs: dict[str, torch.Tensor], modality: str) -> EncoderOutput:
        """Tokens (B, L, D), pooled vector (B, D) and mask of one modality (an encoder
        registered elsewhere may give them as a plain tuple)."""
        return EncoderOutput(*self.encoders[modality](inputs[modality]))

    def encode_all(self, inputs: dict[str, torch.Tensor]) -> Features:
        return {m: self.encode(inputs, m) for m in self.modalities}

    def encoder_parameters(self, modality: str) -> Iterator[nn.Parameter]:
        """Every parameter that encodes ``modality`` (the group optim.encoder_lr sets)."""
        return self.encoders[modality].parameters()

    def fused_logits(self, feats: Features) -> torch.Tensor:
        """Cls(fusion(z^1, ..., z^M)): the feature-level fused prediction."""
        return self.classifier(self.fusion(feats))

    def unimodal_logits(self, modality: str, z: torch.Tensor, lora: bool = False) -> torch.Tensor:
        """Cls's score of one modality's pooled vector, plus LoRA_m(z) when asked (stage 2)."""
        logits = self.fusion.unimodal_logits(self.classifier, self.modalities.index(modality), z)
        if lora:
            logits = logits + self.lora[modality](z)
        return logits


def build_model(modalities: dict[str, dict[str, Any]], num_classes: int, cfg: ModelConfig,
                fusion: str, lora_rank: int = 0, lora_alpha: float = 1.0,
                lora_scale: str = "alpha_over_rank",
                unimodal_heads: bool = False) -> MultimodalModel:
    """A model for the manifest's ``modalities``; ``fusion`` is a registered fusion name;
    with ``lora_rank`` > 0 one LoRA per modality (see :class:`LoRA` for the scale); with
    ``unimodal_heads`` a linear head per modality (:class:`MultimodalModel`)."""
    encoders = {m: build_encoder(m, params, cfg) for m, params in modalities.items()}
    return MultimodalModel(encoders, FUSIONS.get(fusion)(list(modalities), cfg), num_classes,
                           lora_rank, lora_alpha, lora_scale, unimodal_heads)
