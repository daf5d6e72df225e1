"""Encoders: ResNet18 from scratch for spectrograms (1 channel) and video frames.

Each encoder maps its modality's batch to a token sequence (B, L, D) and a pooled
vector (B, D), D being the model width (a linear projection of the ResNet channels).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ccat.config import ModelConfig
from ccat.registry import Registry

ENCODERS: Registry[Callable[[dict[str, Any], ModelConfig], nn.Module]] = Registry("encoder")
# The encoder factory's one table: which encoder reads which modality kind by default.
DEFAULT_ENCODER_BY_KIND = {"spectrogram": "resnet18_audio", "frames": "resnet18_video"}


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al., 2016)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet trunk: 7x7/2 stem, max pool, four stages (widths w, 2w, 4w, 8w)."""

    def __init__(self, in_channels: int, width: int, blocks: list[int]):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 7, 2, 3, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.out_channels = cin
        reset_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.layers(self.stem(x))


def reset_weights(module: nn.Module) -> None:
    """Re-initialize from scratch: Kaiming convolutions (as torchvision), defaults elsewhere."""
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d):
            nn.init.kaiming_normal_(sub.weight, mode="fan_out", nonlinearity="relu")
        elif hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
        if isinstance(sub, nn.BatchNorm2d):
            sub.reset_running_stats()


class _ResNetEncoder(nn.Module):
    """Shared part: ResNet trunk, feature map -> tokens, projection to the model width."""

    def __init__(self, in_channels: int, cfg: ModelConfig):
        super().__init__()
        self.trunk = ResNet(in_channels, cfg.encoder_width, cfg.encoder_blocks)
        self.proj = nn.Linear(self.trunk.out_channels, cfg.width)

    def _tokens(self, images: torch.Tensor, batch: int) -> torch.Tensor:
        fmap = self.trunk(images)  # (B * N, C, h, w)
        tokens = fmap.flatten(2).transpose(1, 2)  # (B * N, h * w, C)
        return self.proj(tokens.reshape(batch, -1, tokens.shape[-1]))  # (B, N * h * w, D)

    def reset(self) -> None:
        reset_weights(self)


@ENCODERS.register("resnet18_audio")
class SpectrogramEncoder(_ResNetEncoder):
    """Spectrogram [B, F, T] as a one-channel image."""

    def __init__(self, params: dict[str, Any], cfg: ModelConfig):
        super().__init__(1, cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self._tokens(x.unsqueeze(1), x.shape[0])
        return tokens, tokens.mean(1)


@ENCODERS.register("resnet18_video")
class FramesEncoder(_ResNetEncoder):
    """Frames [B, N, 3, H, W] folded into the batch, pooled over time and space."""

    def __init__(self, params: dict[str, Any], cfg: ModelConfig):
        super().__init__(3, cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self._tokens(x.flatten(0, 1), x.shape[0])
        return tokens, tokens.mean(1)


def build_encoder(modality: str, params: dict[str, Any], cfg: ModelConfig) -> nn.Module:
    """The encoder for one manifest modality: ``cfg.encoders[modality]`` or the kind's default."""
    name = cfg.encoders.get(modality) or DEFAULT_ENCODER_BY_KIND.get(params["kind"])
    if name is None:
        raise ValueError(f"no encoder reads modality kind {params['kind']!r} yet; set "
                         f"model.encoders.{modality} to one of {ENCODERS.names()}")
    return ENCODERS.get(name)(params, cfg)
