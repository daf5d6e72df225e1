"""The interface every training method implements, and its registry.

The loop owns epochs, schedules, precision, devices, logging and checkpoints; a method
owns its stages and what happens inside one step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ccat.config import MethodConfig, ModelConfig
from ccat.data.pipeline import Batch
from ccat.models import MultimodalModel, build_model
from ccat.registry import Registry
from ccat.step import Step


@dataclass(frozen=True)
class Stage:
    """A named phase of training with its own optimizer and schedule."""

    name: str
    epochs: int


@dataclass
class Outputs:
    """What a method predicts for a batch: fused logits and each modality's logits."""

    fused: torch.Tensor
    unimodal: dict[str, torch.Tensor]


def fuse_decisions(unimodal: dict[str, torch.Tensor], rule: str = "mean") -> torch.Tensor:
    """Decision-level fusion of unimodal logits (CCAT inference)."""
    stacked = torch.stack(list(unimodal.values()))
    if rule == "mean":
        return stacked.mean(0)
    if rule == "sum":
        return stacked.sum(0)
    raise ValueError(f"method.fusion_rule must be 'mean' or 'sum', not {rule!r}")


class Method:
    """Base class: one stage, no model changes between stages."""

    fusion = "sum"

    def __init__(self, cfg: MethodConfig, epochs: int):
        self.cfg = cfg
        self.epochs = epochs
        self.stage: Stage = self.stages()[0]

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int,
                    cfg: ModelConfig) -> MultimodalModel:
        return build_model(modalities, num_classes, cfg, self.fusion)

    def stages(self) -> list[Stage]:
        return [Stage("joint", self.epochs)]

    def begin_stage(self, stage: Stage, model: MultimodalModel) -> None:
        """Prepare ``model`` for ``stage`` (freeze, re-initialize); also called on resume."""
        self.stage = stage

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        raise NotImplementedError

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        raise NotImplementedError


METHODS: Registry[type[Method]] = Registry("method")
