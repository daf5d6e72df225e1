"""MLA, MMPareto and LFM on hand-built tensors, and one step each through the real model."""

import io
import math

import pytest
import torch
import torch.nn.functional as F

from ccat.config import MethodConfig, ModelConfig
from ccat.methods import METHODS
from ccat.methods.lfm import contrastive_loss, gap_weight, js_loss
from ccat.methods.mla import entropy_weights, project_gradient, update_projector
from ccat.methods.mmpareto import min_norm_weights, pareto_combine
from ccat.models import build_model
from ccat.step import Step
from train_helpers import CLASSES, TINY_MODALITIES, random_batch

TINY = ModelConfig(width=16, encoder_width=4, encoder_blocks=[1, 1, 1, 1], heads=2, ffn_mult=2)


class GradStep(Step):
    """A Step that keeps a copy of every gradient each update applies."""

    def __init__(self, optimizer, model):
        super().__init__(optimizer)
        self.model, self.grads = model, []

    def step(self):
        self.grads.append({n: p.grad.detach().clone() for n, p in self.model.named_parameters()
                           if p.grad is not None})
        super().step()


def build(name, **params):
    method = METHODS.get(name)(MethodConfig(name=name, params=params), epochs=1)
    torch.manual_seed(0)
    model = method.build_model(TINY_MODALITIES, len(CLASSES), TINY)
    step = GradStep(torch.optim.SGD(model.parameters(), lr=0.1), model)
    return method, model, step


# MLA


def test_mla_projection_is_orthogonal_to_every_stored_direction():
    gen = torch.Generator().manual_seed(0)
    r1, r2, free = torch.randn(3, 8, generator=gen)
    projector = update_projector(update_projector(torch.eye(8), r1, 1e-6), r2, 1e-6)
    grad = torch.randn(3, 8, generator=gen)
    projected = project_gradient(grad, projector)
    assert projected.norm() > 0.1 * grad.norm()
    for r in (r1, r2):
        assert (projected @ r).abs().max() < 1e-4 * grad.norm() * r.norm()
    # The recursion equals the closed form P = I - A (A^T A + alpha I)^-1 A^T.
    a = torch.stack([r1, r2], 1).double()
    closed = torch.eye(8, dtype=torch.float64) - a @ torch.linalg.inv(
        a.t() @ a + 0.5 * torch.eye(2, dtype=torch.float64)) @ a.t()
    recursive = update_projector(update_projector(torch.eye(8, dtype=torch.float64),
                                                  r1.double(), 0.5), r2.double(), 0.5)
    assert torch.allclose(recursive, closed, atol=1e-10)
    # A direction orthogonal to the stored ones passes through unchanged.
    basis = torch.linalg.qr(torch.stack([r1, r2, free], 1)).Q
    assert torch.allclose(projector @ basis[:, 2], basis[:, 2], atol=1e-4)


def test_mla_step_projects_the_second_modality_off_the_firsts_features():
    method, model, step = build("mla", alpha=1e-6)
    batch = random_batch(3)
    first, second = model.modalities
    r_first = model.encode(batch.inputs, first).pooled.detach().mean(0)
    out = method.train_step(model, batch, step)
    assert set(out) == {f"loss/{first}", f"loss/{second}"}
    g_first, g_second = (g["classifier.weight"] for g in step.grads)
    assert (g_first @ r_first).abs().max() > 1e-3  # the first update is not projected
    assert (g_second @ r_first).abs().max() < 1e-4 * g_second.norm() * r_first.norm()
    assert "classifier.bias" in step.grads[1]  # only the weight is projected
    # The projector survives a weights_only checkpoint round trip.
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    fresh = METHODS.get("mla")(MethodConfig(name="mla"), epochs=1)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh.projector, method.projector)


def test_mla_entropy_weights_favour_the_confident_modality():
    confident = torch.tensor([[6.0, 0.0, 0.0], [0.0, 0.0, 6.0]])
    unsure = torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.0, 0.0]])
    weights = entropy_weights({"a": confident, "b": unsure})
    assert torch.allclose(weights["a"] + weights["b"], torch.ones(2))
    assert (weights["a"] > 0.6).all()
    equal = entropy_weights({"a": confident, "b": confident.flip(1)})
    assert torch.allclose(equal["a"], torch.full((2,), 0.5))
    method, model, _ = build("mla")
    out = method.predict(model, random_batch(4))
    w = entropy_weights(out.unimodal)
    assert torch.allclose(out.fused, sum(w[m].unsqueeze(1) * x for m, x in out.unimodal.items()))
    assert out.representation.shape == (4, 2 * TINY.width)


# MMPareto


def test_mmpareto_agreeing_gradients_get_equal_weights_and_keep_the_sum():
    g_mm, g_u = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    grad, w_mm, w_u, cos = pareto_combine(g_mm, g_u)
    assert cos > 0 and (w_mm, w_u) == (0.5, 0.5)
    assert torch.allclose(grad, g_mm + g_u)


def test_mmpareto_conflicting_gradients_get_the_min_norm_point_rescaled():
    g_mm, g_u = torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 1.5])
    grad, w_mm, w_u, cos = pareto_combine(g_mm, g_u, gamma=1.5)
    assert cos < 0 and math.isclose(w_mm + w_u, 1.0)
    grid = torch.linspace(0, 1, 10001)
    norms = (grid[:, None] * g_mm + (1 - grid[:, None]) * g_u).norm(dim=1)
    assert abs(w_mm - grid[norms.argmin()].item()) < 1e-3  # the min-norm point of the segment
    point = w_mm * g_mm + w_u * g_u
    assert point @ g_mm >= -1e-6 and point @ g_u >= -1e-6  # descends on both losses
    assert torch.allclose(F.normalize(grad, dim=0), F.normalize(point, dim=0), atol=1e-6)
    assert math.isclose(grad.norm().item(), 1.5 * (g_mm + g_u).norm().item(), rel_tol=1e-5)
    assert min_norm_weights(g_mm, g_mm) == (0.5, 0.5)


def test_mmpareto_step_writes_the_combined_gradient_into_each_encoder():
    method, model, step = build("mmpareto")
    batch = random_batch(3)
    feats = model.encode_all(batch.inputs)
    loss_mm = F.cross_entropy(model.fused_logits(feats), batch.label)
    expected = {}
    for m in model.modalities:
        params = list(model.encoders[m].parameters())
        loss_u = F.cross_entropy(model.unimodal_heads[m](feats[m].pooled), batch.label)
        g_mm = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_mm, params,
                                                                      retain_graph=True)])
        g_u = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_u, params,
                                                                     retain_graph=True)])
        expected[m] = pareto_combine(g_mm, g_u)
    out = method.train_step(model, batch, step)
    for m in model.modalities:
        names = [f"encoders.{m}.{n}" for n, _ in model.encoders[m].named_parameters()]
        written = torch.cat([step.grads[0][n].reshape(-1) for n in names])
        assert torch.allclose(written, expected[m][0], rtol=1e-4, atol=1e-7)
        assert (out[f"weight_mm/{m}"], out[f"weight_uni/{m}"]) == expected[m][1:3]
    heads = {"classifier.weight", *(f"unimodal_heads.{m}.weight" for m in model.modalities)}
    assert heads <= set(step.grads[0])  # the heads keep their ordinary gradient


def test_mmpareto_unimodal_heads_are_declared_by_the_model_it_builds():
    _, model, _ = build("mmpareto")
    torch.manual_seed(0)
    declared = build_model(TINY_MODALITIES, len(CLASSES), TINY, "concat", unimodal_heads=True)
    declared.load_state_dict(model.state_dict())  # strict: the same modules under the same names
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  declared.state_dict().values()))
    assert list(model.unimodal_heads) == model.modalities
    assert not list(build_model(TINY_MODALITIES, len(CLASSES), TINY, "concat").unimodal_heads)


# LFM


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


