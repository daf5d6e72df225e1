"""Fusion modules: BiCross (CCAT, appendix A.1); Sum (untied and tied), Concat, FiLM and
BiGated (joint baselines); the shared head of MLA.

A fusion maps per-modality features to the fused vector f that the classifier reads,
and says how the classifier scores one modality alone (Sec. 4.1 for the baselines). A
fusion whose head is not one linear layer over f builds it (``make_classifier``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ccat.config import ConfigError, ModelConfig
from ccat.models.encoders import EncoderOutput, masked_mean
from ccat.registry import Registry, subclasses_of

Features = dict[str, EncoderOutput]  # modality -> its encoder's tokens, pooled z^m and mask
FUSIONS: Registry[Callable[[list[str], ModelConfig], nn.Module]] = Registry(
    "fusion", "ccat.fusions", subclasses_of(nn.Module))


class CrossBlock(nn.Module):
    """One cross-attention block: the query sequence attends to the context (App. A.1, Eq. 14-22)."""

    def __init__(self, width: int, heads: int, ffn_mult: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, ffn_mult * width), nn.ReLU(),
                                 nn.Linear(ffn_mult * width, width))
        self.norm2 = nn.LayerNorm(width)

    def forward(self, query: torch.Tensor, context: torch.Tensor,
                query_mask: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Masks are (B, L) bool, True on real tokens; padded keys get no attention and
        padded queries are left out of the pooling."""
        padding = None if context_mask is None else ~context_mask
        attended, _ = self.attn(query, context, context, key_padding_mask=padding,
                                need_weights=False)
        # Eq. 19 prints the residual as z^1, whose shape (the other sequence's length) cannot
        # be added to the attended query; we add the query, the only shape-valid reading.
        h = self.norm1(query + attended)
        h = self.norm2(h + self.ffn(h))
        return masked_mean(h, query_mask)  # average pooling over the query's real tokens


@FUSIONS.register("bicross")
class BiCross(nn.Module):
    """Two cross-attention blocks, one per direction, their pooled outputs summed (App. A.1)."""

    def __init__(self, modalities: list[str], cfg: ModelConfig):
        super().__init__()
        if len(modalities) != 2:
            raise ConfigError(f"BiCross fuses exactly two modalities, the data has {modalities}; "
                              f"train a method whose fusion takes any number (sum, concat)")
        self.modalities = list(modalities)
        self.blocks = nn.ModuleList(CrossBlock(cfg.width, cfg.heads, cfg.ffn_mult)
                                    for _ in range(2))
        self.out_dim = cfg.width

    def forward(self, feats: Features) -> torch.Tensor:
        first, second = (feats[m] for m in self.modalities)
        return self.blocks[0](second.tokens, first.tokens, second.mask, first.mask) + \
            self.blocks[1](first.tokens, second.tokens, first.mask, second.mask)

    def unimodal_logits(self, classifier: nn.Linear, index: int, z: torch.Tensor) -> torch.Tensor:
        """The shared classifier reads any modality's pooled vector directly."""
        return classifier(z)


class BlockHeads(nn.Module):
    """One linear head per modality, each reading its block of the concatenated vector
    f = [z^1; ...; z^M], summed: fc_1(z^1) + ... + fc_M(z^M), every head with its own bias."""

    def __init__(self, width: int, modalities: int, num_classes: int):
        super().__init__()
        self.width = width
        self.heads = nn.ModuleList(nn.Linear(width, num_classes) for _ in range(modalities))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(block) for head, block in
                            zip(self.heads, f.split(self.width, dim=1))]).sum(0)


@FUSIONS.register("sum")
class SumFusion(nn.Module):
    """Untied sum of unimodal decisions, OGM-GE's SumFusion (fusion_modules.py, the source of
    Table 1's baselines): logits fc_x(z^x) + fc_y(z^y), a head per modality. f is the
    concatenated pooled vectors; a modality alone scores its own head, bias included."""

    def __init__(self, modalities: list[str], cfg: ModelConfig):
        super().__init__()
        self.modalities = list(modalities)
        self.width = cfg.width
        self.out_dim = cfg.width * len(modalities)

    def make_classifier(self, num_classes: int) -> BlockHeads:
        return BlockHeads(self.width, len(self.modalities), num_classes)

    def forward(self, feats: Features) -> torch.Tensor:
        return torch.cat([feats[m].pooled for m in self.modalities], dim=1)

    def unimodal_logits(self, classifier: BlockHeads, index: int, z: torch.Tensor) -> torch.Tensor:
        return classifier.heads[index](z)


@FUSIONS.register("sum_tied")
class TiedSumFusion(nn.Module):
    """f = sum of the pooled vectors, one head W f + b for all modalities (the tied form);
    a modality alone scores W z^m + b / M (Sec. 4.1)."""

    def __init__(self, modalities: list[str], cfg: ModelConfig):
        super().__init__()
        self.modalities = list(modalities)
        self.out_dim = cfg.width

    def forward(self, feats: Features) -> torch.Tensor:
        return torch.stack([feats[m].pooled for m in self.modalities]).sum(0)

    def unimodal_logits(self, classifier: nn.Linear, index: int, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z, classifier.weight, classifier.bias / len(self.modalities))


@FUSIONS.register("concat")
class ConcatFusion(nn.Module):
    """f = concatenated pooled vectors; a modality alone scores its block of W (Sec. 4.1)."""

    def __init__(self, modalities: list[str], cfg: ModelConfig):
        super().__init__()
        self.modalities = list(modalities)
        self.width = cfg.width
        self.out_dim = cfg.width * len(modalities)

    def forward(self, feats: Features) -> torch.Tensor:
        return torch.cat([feats[m].pooled for m in self.modalities], dim=1)

    def unimodal_logits(self, classifier: nn.Linear, index: int, z: torch.Tensor) -> torch.Tensor:
        block = classifier.weight[:, index * self.width:(index + 1) * self.width]
        return F.linear(z, block, classifier.bias / len(self.modalities))


def _pair(name: str, modalities: list[str]) -> list[str]:
    """The two modalities a pairwise fusion combines, or an error naming the data's."""
    if len(modalities) != 2:
        raise ConfigError(f"{name} fuses exactly two modalities, the data has {modalities}; "
                          f"train a method whose fusion takes any number (sum, concat)")
    return list(modalities)


def _alone(z: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Modality ``index``'s pooled vector with the other one disabled (zeros, Sec. 4.1)."""
    pair = [torch.zeros_like(z), torch.zeros_like(z)]
    pair[index] = z
    return pair[0], pair[1]


@FUSIONS.register("film")
class FiLM(nn.Module):
    """f = gamma(z^x) * z^y + beta(z^x) (Perez et al. 2018, as in OGM-GE's fusion_modules.py).

    The first modality (x, the manifest's order) conditions the second (y), as OGM-GE's
    default ``x_film=True`` lets audio condition vision.
    """

    def __init__(self, modalities: list[str], cfg: ModelConfig):
        super().__init__()
        self.modalities = _pair("FiLM", modalities)
        self.film = nn.Linear(cfg.width, 2 * cfg.width)  # z^x -> (gamma, beta)
        self.out_dim = cfg.width

    def fuse(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(x).chunk(2, dim=1)
        return gamma * y + beta

    def forward(self, feats: Features) -> torch.Tensor:
        return self.fuse(*(feats[m].pooled for m in self.modalities))

    def unimodal_logits(self, classifier: nn.Linear, index: int, z: torch.Tensor) -> torch.Tensor:
        """The fused prediction with the other modality's vector zeroed (Sec. 4.1)."""
        return classifier(self.fuse(*_alone(z, index)))


@FUSIONS.register("bigated")
class BiGated(nn.Module):
    """Gated fusion (Kiela et al. 2018, as in OGM-GE's GatedFusion) in both directions, summed:
    f = sigmoid(h^x) * h^y + sigmoid(h^y) * h^x with h^x = W_x z^x + b_x, h^y = W_y z^y + b_y.

    OGM-GE's module gates one way (``x_gate``); "Bi" adds the other way with the same two
    projections, so neither modality is fixed as the gate.
    """

    def __init__(self, modalities: list[str], cfg: ModelConfig):
        super().__init__()
        self.modalities = _pair("BiGated", modalities)
        self.proj = nn.ModuleList(nn.Linear(cfg.width, cfg.width) for _ in range(2))
        self.out_dim = cfg.width

    def fuse(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hx, hy = self.proj[0](x), self.proj[1](y)
        return torch.sigmoid(hx) * hy + torch.sigmoid(hy) * hx

    def forward(self, feats: Features) -> torch.Tensor:
        return self.fuse(*(feats[m].pooled for m in self.modalities))

    def unimodal_logits(self, classifier: nn.Linear, index: int, z: torch.Tensor) -> torch.Tensor:
        """The fused prediction with the other modality's vector zeroed (Sec. 4.1)."""
        return classifier(self.fuse(*_alone(z, index)))


@FUSIONS.register("shared")
class SharedHead(nn.Module):
    """No parameters of its own: the one classifier reads any modality's z^m directly
    (MLA's shared head). The fused vector, used only by ``fused_logits``, is the mean of
    the z^m, whose logits are the mean of the unimodal logits. BiCross scores z^m the same
    way but would bring cross-attention blocks that MLA never trains."""

    def __init__(self, modalities: list[str], cfg: ModelConfig):
        super().__init__()
        self.modalities = list(modalities)
        self.out_dim = cfg.width

    def forward(self, feats: Features) -> torch.Tensor:
        return torch.stack([feats[m].pooled for m in self.modalities]).mean(0)

    def unimodal_logits(self, classifier: nn.Linear, index: int, z: torch.Tensor) -> torch.Tensor:
        return classifier(z)
