"""AMCo: the class mask, a masked step and the dependence test against BalanceBenchmark
(4c1482f) balancemm/trainer/AMCo_trainer.py and models/avclassify_model.py, written out."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from ccat.config import ConfigError
from ccat.methods.amco import class_mask
from method_helpers import build_released
from train_helpers import CLASSES, TINY_MODALITIES, random_batch


def released_mask(eps, l_t, n_classes):
    """AMCo_trainer.py L73-82 (on the CPU)."""
    pt = np.sin(np.pi / 2 * (min(eps, l_t) / eps))
    N = int(pt * n_classes)
    mask_t = np.ones(n_classes - N)
    mask_t = np.pad(mask_t, (0, N))
    np.random.shuffle(mask_t)
    return torch.from_numpy(mask_t).float().unsqueeze(0).expand(2, -1), pt


@pytest.mark.parametrize("l_t", [0.0, 0.05, 0.15, 0.3, 2.0])
def test_class_mask_equals_the_released_draw(l_t):
    np.random.seed(7)
    ours, pt = class_mask(0.3, l_t, 10)
    np.random.seed(7)
    released, released_pt = released_mask(0.3, l_t, 10)
    assert torch.equal(ours, released[0]) and pt == released_pt
    assert int(ours.sum()) == 10 - int(released_pt * 10)


def released_step(model, batch, dependent, mask, sigma, window):
    """avclassify_model.py L337-354 (``BaseClassifierAMCoModel.forward``, one DataParallel
    half's mask row) and AMCo_trainer.py L138-157; returns the new dependence."""
    criterion, softmax = nn.CrossEntropyLoss(), nn.Softmax(dim=1)
    feats = model.encode_all(batch.inputs)
    w, b = model.classifier.weight, model.classifier.bias
    unimodal, now_size, width = {}, 0, feats["audio"].pooled.shape[1]
    output = 0
    for modality in ("audio", "video"):
        block = torch.transpose(w[:, now_size:now_size + width], 0, 1)
        unimodal[modality] = torch.mm(feats[modality].pooled, block) + b / 2
        now_size += width
        if window and dependent.get(modality, False):
            unimodal[modality] = torch.mul(unimodal[modality], mask)
        output = output + unimodal[modality]
    out = model.star(torch.zeros_like(output) + unimodal["audio"] + unimodal["video"])
    label = batch.label
    loss = criterion(out, label)
    if not window:
        loss.backward()
        return dependent
    loss.backward(retain_graph=True)
    for modality in ("audio", "video"):
        criterion(unimodal[modality], label).backward(retain_graph=True)
    sft_out = softmax(torch.cat([unimodal["audio"], unimodal["video"]], 1))
    n = len(CLASSES)
    return {"audio": bool(torch.sum(sft_out[:, :n]) / len(label) > sigma),
            "video": bool(torch.sum(sft_out[:, n:]) / len(label) > sigma)}


@pytest.mark.parametrize("epoch,window", [(1, True), (3, False)])
def test_a_masked_step_equals_the_released_forward_backward_and_test(epoch, window):
    method, model, step = build_released("amco", modulation_ends=2)
    method.begin_epoch(epoch)
    method.progress, method.dependent = 0.15, {"audio": True, "video": False}
    reference, batch = copy.deepcopy(model), random_batch()
    np.random.seed(3)
    out = method.train_step(model, batch, step)
    np.random.seed(3)
    mask, _ = released_mask(0.3, 0.15, len(CLASSES))
    dependent = released_step(reference, batch, {"audio": True, "video": False}, mask[:1],
                              0.5, window)
    assert method.dependent == dependent
    assert method.progress == 0.15 + epoch / 10  # L83
    grads = dict(reference.named_parameters())  # three backward passes there, one here
    for name, grad in step.grads[0].items():
        assert torch.allclose(grad, grads[name].grad, rtol=1e-5, atol=1e-6), name
    assert ("loss/audio" in out) == window
    if window:  # the mask zeroed some of audio's class logits: their gradient is gone
        assert mask[0].sum() < len(CLASSES)


def test_an_epoch_starts_unmasked_and_one_modality_is_refused():
    method, model, step = build_released("amco")
    method.dependent, method.progress = {"audio": True}, 1.0
    method.begin_epoch(1)
    assert method.dependent == {} and method.progress == 0.0
    with pytest.raises(ConfigError, match="needs at least two"):
        method.build_model({"audio": TINY_MODALITIES["audio"]}, len(CLASSES), None)
