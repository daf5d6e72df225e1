"""MLA: the projector and entropy weights on hand-built tensors, a real step, and the
released and gsplugin projections against the released code (issue 13, item 9)."""

import copy
import io
import itertools

import pytest
import torch
import torch.nn.functional as F

from ccat.config import ConfigError, MethodConfig
from ccat.methods import METHODS
from ccat.methods.mla import entropy_weights, plugin_projector, project_gradient, update_projector
from method_helpers import TINY, build_released
from method_helpers import build_with_step as build
from train_helpers import random_batch


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


# Against the released code (issue 13, item 9)


def test_mla_released_never_projects_the_heads_gradient():
    method, model, step = build_released("mla", projection="released")
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
    method, model, step = build_released("mla", projection="gsplugin")
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
        build_released("mla", projection="none")
