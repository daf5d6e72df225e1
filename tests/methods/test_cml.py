"""CML: one step against BalanceBenchmark (4c1482f) balancemm/trainer/CML_trainer.py,
written out below, for either removal order and outside the window."""

import copy

import pytest
import torch
from torch import nn

from ccat.config import ConfigError
from method_helpers import build_released
from train_helpers import CLASSES, TINY_MODALITIES, random_batch


def conf_loss(conf, pred, conf_x, pred_x, label):
    """CML_trainer.py L19-22."""
    sign = (~((pred == label) & (pred_x != label))).long()
    return (max(0, torch.sub(conf_x, conf).sum())), sign.sum()


def released_loss(model, batch, random_dict_, lam, window):
    """CML_trainer.py L170-209 (two modalities), ``Unimodality_Calculate`` as
    avclassify_model.py L107-130 at 4909c17^ ('output': the fused logits)."""
    criterion, softmax = nn.CrossEntropyLoss(), nn.Softmax(dim=1)
    label = batch.label
    feats = model.encode_all(batch.inputs)
    w, b = model.classifier.weight, model.classifier.bias
    width = feats["audio"].pooled.shape[1]
    unimodal_result = {"output": model.fused_logits(feats),
                       "audio": torch.mm(feats["audio"].pooled, w[:, :width].T) + b / 2,
                       "video": torch.mm(feats["video"].pooled, w[:, width:].T) + b / 2}
    if not window:
        return criterion(unimodal_result["output"], label)
    _loss_c = 0
    out_s = unimodal_result["output"]
    random_dict = random_dict_.copy()
    for i in range(2 - 1):
        removed_mm = random_dict.pop()
        out_p = out_s - unimodal_result[removed_mm] + b / 2
        conf_s, pred_s = torch.max(softmax(out_s), dim=1)
        conf_p, pred_p = torch.max(softmax(out_p), dim=1)
        if i == 0:
            loss = criterion(out_s, label)
        loss_p = criterion(out_p, label)
        loss_pc, _ = conf_loss(conf_s, pred_s, conf_p, pred_p, label)
        loss += loss_p
        _loss_c += loss_pc
        out_s = out_p
    return (loss) / 2 + lam * _loss_c


@pytest.mark.parametrize("order,epoch,window", [(["audio", "video"], 0, True),
                                                (["video", "audio"], 0, True),
                                                (["audio", "video"], 2, False)])
def test_a_step_equals_the_released_loss_and_gradients(order, epoch, window):
    method, model, step = build_released("cml", lam=0.5, modulation_ends=1)
    reference, batch = copy.deepcopy(model), random_batch()
    method.begin_epoch(epoch)
    assert sorted(method.order) == ["audio", "video"]
    method.order = list(order)
    out = method.train_step(model, batch, step)
    loss = released_loss(reference, batch, list(order), 0.5, window)
    loss.backward()
    assert out["loss"] == pytest.approx(loss.item(), rel=1e-6)
    grads = dict(reference.named_parameters())
    for name, grad in step.grads[0].items():
        scale = grad.abs().max().item()
        assert torch.allclose(grad, grads[name].grad, rtol=1e-5, atol=1e-6 * scale), name


def test_the_order_is_reshuffled_by_epoch_and_one_modality_is_refused():
    method, model, step = build_released("cml")
    orders = set()
    for epoch in range(8):
        method.begin_epoch(epoch)
        orders.add(tuple(method.order))
    assert orders == {("audio", "video"), ("video", "audio")}
    method.begin_epoch(3)
    again = list(method.order)
    method.begin_epoch(3)
    assert method.order == again  # the same epoch, the same order (a resume repeats it)
    with pytest.raises(ConfigError, match="needs at least two"):
        method.build_model({"audio": TINY_MODALITIES["audio"]}, len(CLASSES), None)
