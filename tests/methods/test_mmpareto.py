"""MMPareto: the gradient combination on hand-built tensors, a real step, the model it
builds, and orthogonal gradients as the released code treats them (issue 13, item 12)."""

import math

import pytest
import torch
import torch.nn.functional as F

from ccat.methods.mmpareto import min_norm_weights, pareto_combine
from ccat.models import build_model
from method_helpers import TINY
from method_helpers import build_with_step as build
from train_helpers import CLASSES, TINY_MODALITIES, random_batch


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


# Against the released code (issue 13, item 12)


def test_mmpareto_orthogonal_gradients_conflict_as_released():
    g_mm, g_u = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])  # cos = 0
    _, w_mm, w_u, cos = pareto_combine(g_mm, g_u)
    # Released: `if this_cos > 0` equal weights, else MinNormSolver; two-task min norm:
    # a = (g_u - g_mm) . g_u / ||g_mm - g_u||^2 = 4 / 5.
    assert cos == 0.0 and (w_mm, w_u) == pytest.approx((0.8, 0.2))
    _, w_mm, w_u, _ = pareto_combine(g_mm, torch.tensor([1e-3, 2.0]))  # cos > 0
    assert (w_mm, w_u) == (0.5, 0.5)
