"""FiLM and BiGated: the two fusion formulas on hand-built tensors (BiGated has no test of
its own; the unimodal protocol of both is in test_registry.py)."""

import pytest
import torch

from ccat.config import ConfigError
from ccat.models import FUSIONS
from ccat.models.encoders import EncoderOutput
from method_helpers import TINY


def test_film_and_bigated_fusion_formulas():
    torch.manual_seed(0)
    film = FUSIONS.get("film")(["audio", "video"], TINY)
    x, y = torch.randn(3, 16), torch.randn(3, 16)
    with torch.no_grad():
        film.film.weight.zero_()
        film.film.bias.copy_(torch.cat([torch.full((16,), 2.0), torch.full((16,), 1.0)]))
    feats = {"audio": EncoderOutput(None, x), "video": EncoderOutput(None, y)}
    assert torch.allclose(film(feats), 2 * y + 1)
    gated = FUSIONS.get("bigated")(["audio", "video"], TINY)
    hx, hy = gated.proj[0](x), gated.proj[1](y)
    fused = gated(feats)
    assert fused.shape == (3, 16) and gated.out_dim == 16
    assert torch.allclose(fused, torch.sigmoid(hx) * hy + torch.sigmoid(hy) * hx)
    for name in ("film", "bigated", "bicross"):  # a user error: one line from the CLI
        with pytest.raises(ConfigError, match="exactly two modalities.*any number"):
            FUSIONS.get(name)(["a", "b", "c"], TINY)
