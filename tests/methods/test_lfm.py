"""LFM: the weight schedule and losses on hand-built tensors, a real step, and the released
variant against the released code (issue 13, item 8)."""

import math

import pytest
import torch
import torch.nn.functional as F

from ccat.config import ConfigError
from ccat.methods.lfm import (contrastive_loss, fitted_weights, gap_weight, js_loss,
                              released_alignment)
from method_helpers import build_released
from method_helpers import build_with_step as build
from train_helpers import random_batch


def test_lfm_weight_schedule_values():
    values = [gap_weight(t, 0.3, 0.05, 0.95) for t in (0, 1, 5, 10, 100)]
    assert values == pytest.approx([0.95, math.exp(-0.3), math.exp(-1.5), 0.05, 0.05])
    method, model, step = build("lfm")
    method.begin_epoch(5)
    out = method.train_step(model, random_batch(3), step)
    assert out["alpha"] == pytest.approx(math.exp(-1.5))
    assert out["loss"] == pytest.approx(out["alpha"] * out["gap"] + (1 - out["alpha"]) * out["ce"],
                                        rel=1e-5)


def test_lfm_contrastive_loss_is_lower_for_aligned_pairs():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 8, generator=gen)
    aligned = a + 0.1 * torch.randn(16, 8, generator=gen)
    shuffled = aligned[torch.randperm(16, generator=gen)]
    assert contrastive_loss(a, aligned, 0.1) < contrastive_loss(a, shuffled, 0.1) - 1.0
    assert js_loss(a, a).abs() < 1e-6 < js_loss(a, shuffled)
    assert torch.isclose(js_loss(a, shuffled), js_loss(shuffled, a))


# Against the released code (issue 13, item 8)


def released_alignment_as_written(p, q):
    """Crema_epoch.py's Alignment, line by line."""
    p = F.softmax(p, dim=-1)
    q = F.softmax(q, dim=-1)
    m = 0.5 * p + 0.5 * q
    kl_p_m = F.kl_div(p.log(), m, reduction="batchmean")
    kl_q_m = F.kl_div(q.log(), m, reduction="batchmean")
    return 0.5 * (kl_p_m + kl_q_m)


def test_lfm_released_alignment_is_the_releases_kl_not_jensen_shannon():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=gen) * 3, torch.randn(5, 3, generator=gen)
    assert torch.allclose(released_alignment(a, b), released_alignment_as_written(a, b),
                          atol=1e-6)
    p, q = a.softmax(1), b.softmax(1)
    m = (p + q) / 2
    kl = lambda x, y: (x * (x / y).log()).sum(1).mean()  # noqa: E731  KL(x || y)
    assert torch.allclose(released_alignment(a, b), (kl(m, p) + kl(m, q)) / 2, atol=1e-6)
    assert torch.allclose(js_loss(a, b), (kl(p, m) + kl(q, m)) / 2, atol=1e-6)
    assert not torch.allclose(js_loss(a, b), released_alignment(a, b), atol=1e-3)


def test_lfm_fitted_schedule_is_the_releases():
    ce_coefs = [2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06,
                2.23835486e-08, -5.39717505e-11]
    align_coefs = [7.95376296e-01, -3.35472727e-03, -1.22989557e-04, 2.92947416e-06,
                   -2.23835486e-08, 5.39717505e-11]
    for epoch in (0, 1, 10, 50, 149):
        released = (sum(c * (epoch ** i) for i, c in enumerate(ce_coefs)),
                    sum(c * (epoch ** i) for i, c in enumerate(align_coefs)))
        assert fitted_weights(epoch) == pytest.approx(released, rel=1e-12)
    assert [round(fitted_weights(t)[1], 2) for t in (0, 50, 150)] == [0.80, 0.56, 0.18]


def test_lfm_released_variant_trains_the_releases_loss_on_per_modality_heads():
    method, model, step = build_released("lfm", variant="released")
    assert len(model.classifier.heads) == 2  # cls_a and cls_v, each with its bias
    batch = random_batch()
    method.begin_epoch(50)
    with torch.no_grad():
        feats = model.encode_all(batch.inputs)
        o_a, o_v = (head(feats[m].pooled) for head, m in zip(model.classifier.heads,
                                                         ("audio", "video")))
        w_cls, w_align = fitted_weights(50)
        released = 2 * (w_cls * F.cross_entropy(0.5 * o_v + 0.5 * o_a, batch.label)
                        + w_align * released_alignment_as_written(o_a, o_v))
    out = method.train_step(model, batch, step)
    assert out["loss"] == pytest.approx(released.item(), rel=1e-5)
    assert out["alpha"] == pytest.approx(w_align)
    predicted = method.predict(model, batch)
    assert torch.allclose(predicted.fused, o_a + o_v, atol=1e-5)  # the release's o_b
    with pytest.raises(ConfigError, match="variant"):
        build_released("lfm", variant="release")
