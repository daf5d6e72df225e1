"""MBSD: one step against BalanceBenchmark (4c1482f) balancemm/trainer/MBSD_trainer.py,
written out below, inside and outside its window."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ccat.config import ConfigError
from method_helpers import build_released
from train_helpers import CLASSES, TINY_MODALITIES, random_batch


def released_loss(model, batch, window):
    """MBSD_trainer.py L107-159 and L226-229 for two modalities (``key`` = audio, video),
    u^m as avclassify_model.py L287-293."""
    criterion, softmax = nn.CrossEntropyLoss(), nn.Softmax(dim=1)
    feats = model.encode_all(batch.inputs)
    w_head, b = model.classifier.weight, model.classifier.bias
    width = feats["audio"].pooled.shape[1]
    unimodal = {"audio": torch.mm(feats["audio"].pooled, w_head[:, :width].T) + b / 2,
                "video": torch.mm(feats["video"].pooled, w_head[:, width:].T) + b / 2}
    label, key = batch.label, ["audio", "video"]
    loss_out = criterion(model.fused_logits(feats), label)
    if not window:
        return loss_out
    prediction = {m: softmax(unimodal[m]) for m in key}
    loss_RS = 1 / unimodal[key[0]].shape[1] * torch.sum((unimodal[key[0]] - unimodal[key[1]]) ** 2,
                                                        dim=1)
    n = len(label)
    w, ps, pw = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    y_pred = {m: prediction[m].argmax(dim=-1) for m in key}
    for i in range(n):
        a, v = prediction[key[0]][i][label[i]], prediction[key[1]][i][label[i]]
        if y_pred[key[0]][i] == label[i] or y_pred[key[1]][i] == label[i]:
            w[i] = max(a, v) - min(a, v)
        ps[i] = max(a, v)
        pw[i] = min(a, v)
    loss_KL = torch.mm(w.reshape(1, -1), F.kl_div(ps, pw, reduction="none").reshape(-1, 1)) / n
    loss_RS = torch.mm(w.reshape(1, -1), loss_RS.reshape(-1, 1)) / n
    return (loss_out + criterion(unimodal[key[0]], label) + criterion(unimodal[key[1]], label)
            + loss_RS.squeeze() + loss_KL.squeeze())


@pytest.mark.parametrize("epoch,window", [(0, True), (2, False)])
def test_a_step_equals_the_released_loss_and_gradients(epoch, window):
    method, model, step = build_released("mbsd", modulation_ends=1)
    reference, batch = copy.deepcopy(model), random_batch()
    with torch.no_grad():  # a trained-looking head: some samples right, the weights w > 0
        for net in (model, reference):
            net.classifier.weight.mul_(40)
    method.begin_epoch(epoch)
    out = method.train_step(model, batch, step)
    loss = released_loss(reference, batch, window)
    loss.backward()
    assert sum(v for k, v in out.items()) == pytest.approx(loss.item(), rel=1e-5)
    assert ("loss/rs" in out) == window
    if window:
        assert out["loss/rs"] > 0 and out["loss/kl"] != 0
    grads = dict(reference.named_parameters())
    for name, grad in step.grads[0].items():
        scale = grad.abs().max().item()
        assert torch.allclose(grad, grads[name].grad, rtol=1e-5, atol=1e-6 * scale), name


def test_mbsd_refuses_other_than_two_modalities():
    method, _, _ = build_released("mbsd")
    with pytest.raises(ConfigError, match="exactly two modalities"):
        method.build_model({"audio": TINY_MODALITIES["audio"]}, len(CLASSES), None)
