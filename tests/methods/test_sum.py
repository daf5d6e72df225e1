"""Sum and sum_tied: the two sum fusions against OGM-GE's released SumFusion (issue 13,
item 11)."""

import torch

from ccat.methods import METHODS
from ccat.models import build_model
from ccat.models.encoders import EncoderOutput
from method_helpers import TINY
from train_helpers import CLASSES, TINY_MODALITIES


def test_sum_is_ogm_ges_untied_sumfusion_and_sum_tied_the_tied_form():
    model = build_model(TINY_MODALITIES, len(CLASSES), TINY, "sum")
    fc_x, fc_y = model.classifier.heads  # OGM-GE's SumFusion: fc_x(x) + fc_y(y)
    x, y = torch.randn(4, TINY.width), torch.randn(4, TINY.width)
    feats = {"audio": EncoderOutput(x[:, None], x), "video": EncoderOutput(y[:, None], y)}
    assert torch.allclose(model.fused_logits(feats), fc_x(x) + fc_y(y), atol=1e-6)
    # main.py's out_a for fusion 'sum': a @ fc_x.weight^T + fc_x.bias (its own bias, whole).
    assert torch.allclose(model.unimodal_logits("audio", x),
                          torch.mm(x, fc_x.weight.t()) + fc_x.bias)
    assert not torch.equal(fc_x.bias, fc_y.bias)
    tied = build_model(TINY_MODALITIES, len(CLASSES), TINY, "sum_tied")
    w, b = tied.classifier.weight, tied.classifier.bias
    assert torch.allclose(tied.fused_logits(feats), (x + y) @ w.t() + b, atol=1e-6)
    assert torch.allclose(tied.unimodal_logits("audio", x), x @ w.t() + b / 2, atol=1e-6)
    assert METHODS.get("sum_tied").fusion == "sum_tied" and METHODS.get("sum").fusion == "sum"
