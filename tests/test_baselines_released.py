"""The baselines against their released code (issue 13, items 8-13): for every "released"
option, the released formula written out here on hand-built tensors and compared."""

import copy
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ccat.config import ConfigError, MethodConfig, ModelConfig
from ccat.methods import METHODS
from ccat.methods.lfm import fitted_weights, js_loss, released_alignment
from ccat.methods.mla import plugin_projector
from ccat.methods.mmpareto import pareto_combine
from ccat.methods.ogm_ge import coefficients, discrepancy_ratios
from ccat.methods.qmf import normalized
from ccat.models import build_model
from ccat.models.encoders import EncoderOutput
from ccat.step import Step
from train_helpers import CLASSES, TINY_MODALITIES, random_batch

TINY = ModelConfig(width=16, encoder_width=4, encoder_blocks=[1, 1, 1, 1], heads=2, ffn_mult=2)


class GradStep(Step):
    """A Step that records the gradients each update applies."""

    def __init__(self, optimizer, model):
        super().__init__(optimizer)
        self.model, self.grads = model, []

    def step(self, momentum=True):
        self.grads.append({n: p.grad.detach().clone() for n, p in self.model.named_parameters()
                           if p.grad is not None})
        super().step(momentum)


def build(name, lr=0.0, **params):
    method = METHODS.get(name)(MethodConfig(name=name, params=params), epochs=3)
    method.bind_data(train_samples=6, batches_per_epoch=4)
    torch.manual_seed(0)
    model = method.build_model(TINY_MODALITIES, len(CLASSES), TINY)
    return method, model, GradStep(torch.optim.SGD(model.parameters(), lr=lr), model)


# 8. LFM


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
    method, model, step = build("lfm", variant="released")
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
        build("lfm", variant="release")


# 9. MLA


def test_mla_released_never_projects_the_heads_gradient():
    method, model, step = build("mla", projection="released")
    reference = copy.deepcopy(model)
    batch = random_batch()
    method.train_step(model, batch, step)
    for i, m in enumerate(model.modalities):
        reference.zero_grad()
        z = reference.encode(batch.inputs, m).pooled
        F.cross_entropy(reference.unimodal_logits(m, z), batch.label).backward()
        assert torch.allclose(step.grads[i]["classifier.weight"], reference.classifier.weight.grad,
                              atol=1e-6)
    assert method.projector is None


def test_mla_gsplugin_is_the_plugins_body_as_written():
    method, model, step = build("mla", projection="gsplugin")
    reference = copy.deepcopy(model)
    batch = random_batch()
    method.begin_epoch(0)
    method.train_step(model, batch, step)  # batch 0 of 4: alpha = 0.1 * 0.1 ** 0
    method.train_step(model, batch, step)  # batch 1 of 4: alpha = 0.1 * 0.1 ** 0.25
    identity = torch.eye(TINY.width)
    pl, expected = identity.clone(), []
    for batch_index, m in itertools.product((0, 1), model.modalities):
        reference.zero_grad()
        a = reference.encode(batch.inputs, m).pooled
        F.cross_entropy(reference.unimodal_logits(m, a), batch.label).backward()
        grad = reference.classifier.weight.grad
        if (batch_index, m) != (0, "audio"):  # GSPlugin.before_update, exp_count != 0
            alpha = 1.0 * 0.1 ** (batch_index / 4 + 1)
            r = torch.mean(a.detach(), 0, True)
            k = torch.mm(pl, torch.t(r))
            pl = torch.sub(pl, torch.mm(k, torch.t(k)) / (alpha + torch.mm(k, r)))
            pl = pl / torch.norm(pl, p="fro")
            grad = torch.mm(grad, torch.t(pl))
        expected.append(grad)
    for got, want in zip(step.grads, expected):
        assert torch.allclose(got["classifier.weight"], want, rtol=1e-4, atol=1e-6)
    assert method.calls == 4 and torch.allclose(method.projector, pl, atol=1e-6)
    # Not symmetric after its second update, so grad P^T is not grad P.
    assert not torch.allclose(method.projector, method.projector.t(), atol=1e-4)
    r = torch.randn(TINY.width)
    assert torch.allclose(plugin_projector(identity, r, 0.1).norm(), torch.tensor(1.0))
    with pytest.raises(ConfigError, match="projection"):
        build("mla", projection="none")


# 10. QMF


def released_history_normalized(n_data, updates, query):
    """QMF's History: np.zeros(n_data), += per-sample losses, min-max over all n_data."""
    correctness = np.zeros(n_data)
    for idx, losses in updates:
        correctness[idx] += losses
    data = correctness[query]
    return (data - correctness.min()) / (correctness.max() - correctness.min())


def test_qmf_history_normalizes_over_every_training_sample_as_released():
    updates = [([0, 1], np.array([1.0, 3.0])), ([2, 1], np.array([2.0, 1.0]))]
    history: dict[str, float] = {}
    for idx, losses in updates:
        for i, v in zip(idx, losses):
            history[f"k{i}"] = history.get(f"k{i}", 0.0) + v
    expected = released_history_normalized(5, updates, [2, 0])  # samples 3, 4 unseen
    assert normalized(history, ["k2", "k0"], total=5).tolist() == pytest.approx(expected.tolist())
    assert normalized(history, ["k2", "k0"], total=3).tolist() == pytest.approx(
        released_history_normalized(3, updates, [2, 0]).tolist())  # all seen: the same rule
    assert normalized(history, ["k2", "k0"]).tolist() == pytest.approx([1 / 3, 0.0])  # seen


def test_qmf_step_ranks_against_the_released_normalization():
    batch = random_batch()

    def rank(**params):
        method, model, step = build("qmf", **params)
        method.bind_data(train_samples=100, batches_per_epoch=1)
        return method.train_step(model, batch, step)["rank"]

    assert rank() != pytest.approx(rank(history_norm="seen"))
    with pytest.raises(ConfigError, match="history_norm"):
        build("qmf", history_norm="all")


# 11. Sum


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


# 12. Edges


def released_ogm_coefficients(score_a, score_v, alpha):
    """main.py: ratio_v = score_v / score_a; if ratio_v > 1 damp v, else damp a."""
    ratio_v = score_v / score_a
    ratio_a = 1 / ratio_v
    if ratio_v > 1:
        return 1, 1 - math.tanh(alpha * max(ratio_v, 0))
    return 1 - math.tanh(alpha * max(ratio_a, 0)), 1


def test_ogm_coefficients_match_the_released_branches_ties_included():
    for score_a, score_v in ((2.0, 1.0), (1.0, 2.0), (1.5, 1.5), (0.3, 0.3), (1.0, 1.0001)):
        coefs = coefficients(discrepancy_ratios({"audio": score_a, "video": score_v}), 0.8)
        assert (coefs["audio"], coefs["video"]) == pytest.approx(
            released_ogm_coefficients(score_a, score_v, 0.8))
    tie = coefficients({"audio": 1.0, "video": 1.0}, 0.8)
    assert tie["audio"] == pytest.approx(0.336, abs=1e-3) and tie["video"] == 1.0


def test_mmpareto_orthogonal_gradients_conflict_as_released():
    g_mm, g_u = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])  # cos = 0
    _, w_mm, w_u, cos = pareto_combine(g_mm, g_u)
    # Released: `if this_cos > 0` equal weights, else MinNormSolver; two-task min norm:
    # a = (g_u - g_mm) . g_u / ||g_mm - g_u||^2 = 4 / 5.
    assert cos == 0.0 and (w_mm, w_u) == pytest.approx((0.8, 0.2))
    _, w_mm, w_u, _ = pareto_combine(g_mm, torch.tensor([1e-3, 2.0]))  # cos > 0
    assert (w_mm, w_u) == (0.5, 0.5)


# 13. The unimodal ensemble


def test_unimodal_ensemble_gives_each_modality_its_own_head_and_bias():
    method, model, step = build("unimodal", lr=0.1)
    audio, video = model.classifier.heads
    batch = random_batch()
    z = model.encode(batch.inputs, "audio").pooled
    F.cross_entropy(model.unimodal_logits("audio", z), batch.label).backward()
    assert audio.bias.grad is not None and video.bias.grad is None  # nothing shared
    model.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    method.train_step(model, batch, step)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {"classifier.heads.0.bias", "classifier.heads.1.bias"} <= changed
