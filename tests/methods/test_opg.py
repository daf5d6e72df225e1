"""OPG: the coefficients, warm-up and window against the released code
(GeWu-Lab/BML_TPAMI2024 at 4b3aa4f, code/main.py), written out below."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ccat.methods.ogm_ge import discrepancy_ratios
from ccat.methods.opg import opg_coefficients
from method_helpers import build_released
from train_helpers import random_batch


def released_coefficients(performance_1, performance_2, alpha):
    """main.py L119-120 and L138-148 (``use_OGM_plus`` off)."""
    relu, tanh = nn.ReLU(inplace=True), nn.Tanh()
    radio_1 = performance_1 / performance_2
    radio_2 = performance_2 / performance_1
    if radio_1 > 1:
        return 1 - tanh(alpha * relu(radio_1)), 1
    return 1, 1 - tanh(alpha * relu(radio_2))


def test_coefficients_equal_the_released_branches_ties_included():
    for s1, s2 in ((2.0, 1.0), (1.0, 2.0), (1.5, 1.5), (0.3, 0.3), (1.0, 1.0001), (4.2, 4.1)):
        ours = opg_coefficients(discrepancy_ratios({"audio": s1, "video": s2}), 0.8)
        released = released_coefficients(torch.tensor(s1), torch.tensor(s2), 0.8)
        assert (ours["audio"], ours["video"]) == pytest.approx([float(c) for c in released])
    tie = opg_coefficients({"audio": 1.0, "video": 1.0}, 0.8)  # OGM-GE's CVPR code: audio
    assert tie == pytest.approx({"audio": 1.0, "video": 1 - math.tanh(0.8)})


def opg_grads(epoch, **params):
    """One OPG step at ``epoch`` (lr 0), its outputs, its gradients and the plain fused CE's."""
    method, model, step = build_released("opg", modulation="OGM", **params)
    reference = copy.deepcopy(model)
    batch = random_batch()
    F.cross_entropy(reference.fused_logits(reference.encode_all(batch.inputs)),
                    batch.label).backward()
    method.begin_epoch(epoch)
    out = method.train_step(model, batch, step)
    return out, reference, step.grads[0], {n: p.grad for n, p in reference.named_parameters()}


def released_scores(model, batch):
    """Classifier.py L112-143: sum_i softmax(W_m z_i^m + b / 2)_{y_i} of each modality."""
    with torch.no_grad():
        feats = model.encode_all(batch.inputs)
    w, b = model.classifier.weight.detach(), model.classifier.bias.detach()
    width = feats["audio"].pooled.shape[1]
    t1 = torch.mm(feats["audio"].pooled, w[:, :width].T) + b / 2
    t2 = torch.mm(feats["video"].pooled, w[:, width:].T) + b / 2
    label = batch.label
    return (sum(t1.softmax(1)[i][label[i]] for i in range(len(label))),
            sum(t2.softmax(1)[i][label[i]] for i in range(len(label))))


@pytest.mark.parametrize("epoch,modulated", [(5, False), (60, True), (61, False)])
def test_the_dominant_encoder_is_scaled_after_warm_up_inside_the_inclusive_window(epoch,
                                                                               modulated):
    out, reference, grads, plain = opg_grads(epoch)
    coef_1, coef_2 = released_coefficients(*released_scores(reference, random_batch()), 0.8)
    released = {"audio": float(coef_1), "video": float(coef_2)} if modulated else \
        {"audio": 1.0, "video": 1.0}
    assert {m: out[f"coef/{m}"] for m in released} == pytest.approx(released)
    if modulated:
        assert min(released.values()) < 1.0
    for name, grad in grads.items():
        owner = name.split(".")[1] if name.startswith("encoders.") else None
        expected = plain[name] * released[owner] if owner else plain[name]
        assert torch.allclose(grad, expected, rtol=1e-5, atol=1e-7), name
