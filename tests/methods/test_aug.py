"""AUG: the boosted head and its loss against the released code on hand-built tensors, the
two updates of a step, the growth rule and schedule, the fused inference, and a resume that
rebuilds the grown model exactly (issue 26)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ccat.config import MethodConfig
from ccat.methods import METHODS
from ccat.methods.aug import HEADS, boosted_loss, check_every, checks, classify, slots_needed, \
    weaker
from ccat.methods.base import RunData
from ccat.train import train
from method_helpers import TINY, RecordingStep, build_pair, owners
from train_helpers import CLASSES, TINY_MODALITIES, interrupt_then_resume, random_batch, \
    tiny_config, write_tiny_dataset


def released_classfier(embedding, fc_out, additional_layers, x):
    """njustkmg/NeurIPS25-AUG 841d079e, model/AudioVideo.py:75-89, written out."""
    relu = nn.ReLU()
    result_a = relu(embedding(x))  # embedding_a = Sequential(Linear(512, 256), ReLU()) (47-50)
    feature = fc_out(result_a)
    o_fea = feature
    add_fea = None
    i = 0
    layerlen = len(additional_layers)
    for layer in additional_layers:
        addf = relu(layer(x))
        add_fea = fc_out(addf)
        feature = feature + add_fea
        i = i + 1
        if i < layerlen:
            o_fea = feature
    return feature, o_fea, add_fea


def released_loss(out_a, o_fea, add_fea, y):
    """train_CREMAD.py:39, 53-57, with the one-hot labels of its CramedDataset."""
    criterion = nn.CrossEntropyLoss(reduction="none")
    if add_fea is None:
        return criterion(out_a, y).mean()
    kl = y * o_fea.detach().softmax(1)
    return criterion(out_a, y).mean() + criterion(o_fea, y).mean() + \
        criterion(add_fea, y).mean() - 0.5 * criterion(add_fea, kl).mean()


@pytest.mark.parametrize("grown", [(), (0,), (0, 1, 0, 0)])
def test_aug_head_and_loss_equal_the_released_code(grown):
    method = METHODS.get("aug")(MethodConfig(name="aug"), epochs=10)  # 9 slots
    torch.manual_seed(0)
    model = method.build_model(TINY_MODALITIES, len(CLASSES), TINY).double()
    heads = getattr(model, HEADS)
    torch.manual_seed(1)
    for index in grown:
        heads.grow(index)
    z = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    label = torch.tensor([0, 1, 2, 1, 0])
    for index, m in enumerate(model.modalities):
        ours = classify(model, m, z)
        added = [s for s, owner in zip(heads.slots, heads.owners) if owner == index]
        theirs = released_classfier(heads.embed[m], model.classifier, added, z)
        assert len(added) == sum(g == index for g in grown)
        for a, b in zip(ours, theirs):
            assert (a is None and b is None) or torch.allclose(a, b, atol=1e-12)
        loss = boosted_loss(*ours, label, 0.5)
        expected = released_loss(*theirs, F.one_hot(label, 3).double())
        assert torch.allclose(loss, expected, atol=1e-12)
        grad, = torch.autograd.grad(loss, z)
        grad_expected, = torch.autograd.grad(expected, z)
        assert torch.allclose(grad, grad_expected, atol=1e-12)


@pytest.mark.parametrize("grown", ["trained", "released"])
def test_aug_step_updates_audio_then_video_and_the_added_layers_as_chosen(grown):
    method, model = build_pair("aug", grown=grown)
    heads = getattr(model, HEADS)
    heads.grow(0)  # one layer for audio (the first slot), one for video (the second)
    heads.grow(1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1,
                          momentum=0.9)
    step = RecordingStep(opt, model)
    out = method.train_step(model, random_batch(), step)
    assert set(out) == {"loss", "loss/audio", "loss/video", "layers/audio", "layers/video"}
    assert out["loss"] == pytest.approx(0.4 * out["loss/audio"] + 0.6 * out["loss/video"])
    assert out["layers/audio"] == out["layers/video"] == 1
    audio, video = (owners(c) for c in step.changes)
    slots = {"aug.slots.0.weight", "aug.slots.0.bias", "aug.slots.1.weight", "aug.slots.1.bias"}
    assert "encoders.audio" in audio and "encoders.video" not in audio
    assert "encoders.video" in video and "encoders.audio" not in video
    assert "classifier" in audio and "classifier" in video  # the shared fc_out, twice
    moved = (step.changes[0] | step.changes[1]) & slots
    if grown == "trained":
        assert moved == slots
    else:  # the release's optimizer never holds an added layer
        assert not moved and not any(p.requires_grad for p in heads.slots.parameters())
    assert method.scores.shape == (2,) and (method.scores > 0).all()


def released_checks(epoch_dict):
    """train_CREMAD.py:205-208, 220: the epochs whose end runs the growth check."""
    check = int(epoch_dict / 10) if epoch_dict > 10 else 1
    return [epoch for epoch in range(epoch_dict) if (epoch + 1) % check == 0 or epoch == 0]


@pytest.mark.parametrize("epochs", [1, 3, 10, 11, 25, 200])
def test_aug_checks_as_released_and_has_a_slot_for_every_layer_that_trains(epochs):
    expected = released_checks(epochs)
    assert [e for e in range(epochs) if checks(e, epochs)] == expected
    assert check_every(200) == 20
    assert slots_needed(epochs) == len([e for e in expected if e < epochs - 1])


def test_aug_grows_the_weaker_modality_outside_the_band():
    """train_CREMAD.py:222-228: rho > lam + 0.01 adds to video, rho < lam - 0.01 to audio."""
    assert weaker(1.02, 1.0, 0.01) == 1 and weaker(0.98, 1.0, 0.01) == 0
    assert weaker(1.01, 1.0, 0.01) is None and weaker(0.99, 1.0, 0.01) is None
    method, model = build_pair("aug")  # 3 epochs: checks after epochs 0 and 1, two slots
    heads = getattr(model, HEADS)
    assert heads.owners == [-1, -1]
    data = RunData(None, None, 0, torch.device("cpu"))
    for epoch, scores, owners_after in [(1, [3.0, 2.0], [1, -1]), (2, [2.0, 2.01], [1, -1])]:
        method.scores = torch.tensor(scores, dtype=torch.float64)
        method.begin_epoch(epoch)
        method.before_epoch(model, data)
        assert heads.owners == owners_after and heads.owner.tolist() == owners_after
        assert method.scores is None
    assert method.ratio == pytest.approx(2.0 / 2.01)


def test_aug_inference_is_alpha_audio_plus_one_minus_alpha_video():
    method, model = build_pair("aug", merge_alpha=0.25)
    getattr(model, HEADS).grow(1)
    out = method.predict(model, random_batch(4))
    assert torch.allclose(out.fused, 0.25 * out.unimodal["audio"] + 0.75 * out.unimodal["video"])
    feats = model.encode_all(random_batch(4).inputs)
    assert torch.allclose(out.unimodal["video"],
                          classify(model, "video", feats["video"].pooled)[0])


def test_aug_resume_rebuilds_the_grown_model_exactly(tmp_path, monkeypatch):
    data = write_tiny_dataset(tmp_path / "data", counts={"train": 8, "val": 2, "test": 2},
                              size=16, steps=16)
    cfg = tiny_config(data, tmp_path / "full", method="aug", epochs=3)
    cfg.method.params = {"band": 0.0}  # every check grows a layer: after epochs 1 and 2
    train(cfg)
    cfg.out = str(tmp_path / "cut")
    interrupt_then_resume(cfg, monkeypatch, at_epoch=3)  # resumes a model with one layer
    full, cut = (torch.load(tmp_path / run / "last.pt", weights_only=True)
                 for run in ("full", "cut"))
    assert (full["model"]["aug.owner"] >= 0).sum() == 2
    assert full["model"].keys() == cut["model"].keys()
    assert all(torch.equal(full["model"][k], cut["model"][k]) for k in full["model"])
    assert full["method_state"]["ratio"] == cut["method_state"]["ratio"]
