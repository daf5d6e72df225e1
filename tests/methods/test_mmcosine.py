"""MMCosine: the cosine logits on hand-built tensors, the released update rule against a real
step, what a step updates, and its predictions (issue 16)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ccat.methods.mmcosine import cosine_logits
from method_helpers import build_released, one_step, owners
from train_helpers import CLASSES, random_batch


def test_cosine_logits_and_loss_on_hand_built_tensors():
    z = torch.tensor([[3.0, 4.0], [0.0, -2.0]])  # |z_0| = 5, |z_1| = 2
    weight = torch.tensor([[2.0, 0.0], [0.0, 0.5], [-1.0, -1.0]])  # three classes, any norm
    logits = cosine_logits(z, weight, scaling=10.0)
    expected = 10.0 * torch.tensor([[0.6, 0.8, -7 / (5 * math.sqrt(2))],
                                    [0.0, -1.0, 2 / (2 * math.sqrt(2))]])
    assert torch.allclose(logits, expected)
    # Neither a feature's norm nor a class weight's norm changes a logit.
    rescaled = cosine_logits(z * torch.tensor([[7.0], [0.1]]),
                             weight * torch.tensor([[0.01], [3.0], [9.0]]), scaling=10.0)
    assert torch.allclose(rescaled, logits)
    # The fused logit is the sum over modalities; with z^2 = z^1 and W^2 = W^1 the CE of
    # sample 0 (label 1) is -log softmax(2 * 10 * cos_0)_1 = log(1 + e^(12 - 16) + e^(-19.8 - 16)).
    fused = logits + cosine_logits(z, weight, 10.0)
    by_hand = math.log(1 + math.exp(12 - 16) + math.exp(-140 / (5 * math.sqrt(2)) - 16))
    assert F.cross_entropy(fused[:1], torch.tensor([1])).item() == pytest.approx(by_hand, abs=1e-6)


def released_loss(model, batch, scaling):
    """The released main_CD.py (lines 112-118, 141, --lam 0), written as it is there:
    out_a = mm(normalize(a, dim=1), normalize(fc_out.weight[:, :512].T, dim=0)) * s,
    out_v likewise with fc_out.weight[:, 512:], out = out_a + out_v, loss = CE(out, y)."""
    feats = model.encode_all(batch.inputs)
    a, v = (feats[m].pooled for m in model.modalities)
    weight, width = model.classifier.weight, a.shape[1]
    out_a = torch.mm(F.normalize(a, dim=1), F.normalize(weight[:, :width].t(), dim=0)) * scaling
    out_v = torch.mm(F.normalize(v, dim=1), F.normalize(weight[:, width:].t(), dim=0)) * scaling
    return F.cross_entropy(out_a + out_v, batch.label), out_a, out_v


@pytest.mark.parametrize("scaling", [10.0, 15.0])
def test_mmcosine_step_applies_the_released_loss_and_its_gradients(scaling):
    method, model, step = build_released("mmcosine", scaling=scaling)
    reference = copy.deepcopy(model)
    batch = random_batch()
    loss, _, _ = released_loss(reference, batch, scaling)
    loss.backward()
    out = method.train_step(model, batch, step)
    assert out["loss"] == pytest.approx(loss.item(), rel=1e-6)
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert set(step.grads[0]) == set(expected)
    assert "classifier.bias" not in expected  # the cosine logits carry no bias
    for name, grad in step.grads[0].items():
        assert torch.allclose(grad, expected[name], atol=1e-6), name


def test_mmcosine_step_updates_encoders_and_head_weights_but_not_the_bias():
    method, model, out, changes = one_step("mmcosine", 0)
    assert owners(changes[0]) == {"encoders.audio", "encoders.video", "classifier"}
    assert "classifier.weight" in changes[0] and "classifier.bias" not in changes[0]
    assert set(out) == {"loss", "loss/audio", "loss/video"}


def test_mmcosine_predicts_each_modalitys_cosine_logits_and_their_sum():
    method, model, _ = build_released("mmcosine")
    model.eval()
    batch = random_batch(4)
    with torch.no_grad():
        _, out_a, out_v = released_loss(model, batch, 10.0)
        predicted = method.predict(model, batch)
        assert torch.allclose(predicted.unimodal["audio"], out_a, atol=1e-6)
        assert torch.allclose(predicted.unimodal["video"], out_v, atol=1e-6)
        assert torch.allclose(predicted.fused, out_a + out_v, atol=1e-6)
        assert predicted.fused.abs().max() <= 2 * 10.0 + 1e-5  # |logit| <= M * s
        assert predicted.representation.shape == (4, 2 * predicted.embeddings["audio"].shape[1])
        # Inflating one modality's block of the head and its bias changes no prediction.
        width = model.fusion.width
        model.classifier.weight[:, :width] *= 50.0
        model.classifier.bias += 3.0
        again = method.predict(model, batch)
    assert torch.allclose(again.fused, predicted.fused, atol=1e-5)
    assert predicted.fused.shape == (4, len(CLASSES))
