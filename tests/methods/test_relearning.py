"""Diagnosing & Re-learning against its released rule (GeWu-Lab/Diagnosing_Relearning_ECCV2024,
code/ours.py): purity of k-means on min-max scaled features, the re-init strength
tanh(lambda |P_train - P_val|), the soft re-init of every encoder parameter, the schedule;
then the whole diagnosis on real features, a real step, and a resume through a re-init."""

import copy
import json

import numpy as np
import pytest
import torch
from sklearn import preprocessing
from sklearn.cluster import KMeans
from sklearn.metrics import accuracy_score
from torch import nn

from ccat.config import DataConfig
from ccat.data.reader import open_dataset
from ccat.errors import CcatError
from ccat.methods import RunData
from ccat.methods.relearning import (cluster_purity, diagnosis_epochs, purity, reinit_strength,
                                     soft_reinit)
from ccat.step import Step
from ccat.train import train
from method_helpers import TINY, build_pair, build_with_step
from train_helpers import interrupt_then_resume, random_batch, tiny_config, write_tiny_dataset


# The released rule, as ours.py writes it


def released_purity(y_true, y_pred):
    """purity_score, L63-95: labels mapped to 0..L-1, each cluster votes its histogram's
    argmax, the accuracy of the votes."""
    y_true = y_true.copy()  # the released function relabels its argument in place
    y_voted_labels = np.zeros(y_true.shape)
    labels = np.unique(y_true)
    for k in range(labels.shape[0]):
        y_true[y_true == labels[k]] = np.arange(labels.shape[0])[k]
    labels = np.unique(y_true)
    bins = np.concatenate((labels, [np.max(labels) + 1]), axis=0)
    for cluster in np.unique(y_pred):
        hist, _ = np.histogram(y_true[y_pred == cluster], bins=bins)
        y_voted_labels[y_pred == cluster] = np.argmax(hist)
    return accuracy_score(y_true, y_voted_labels)


def released_split_purity(features, labels, n_classes, n_init="auto"):
    """reinit_score, L107-115: MinMaxScaler(-1, 1), KMeans(n_clusters, random_state=0) with
    scikit-learn's default n_init ('auto' since 1.4; 10 before)."""
    result = preprocessing.MinMaxScaler(feature_range=(-1, 1)).fit_transform(features)
    y_pred = KMeans(n_clusters=n_classes, random_state=0, n_init=n_init).fit_predict(result)
    return released_purity(np.array(labels), y_pred)


def released_weight(train_purity, val_purity, move_lambda):
    """L122-127: torch.tanh(torch.tensor(move_lambda * |gap|)), a float64 tensor."""
    return torch.tanh(torch.tensor(move_lambda * np.abs(train_purity - val_purity)))


def released_reinit(encoder, checkpoint, weight):
    """reinit, L156-166 (without .cuda()): every named parameter, param.data replaced."""
    for name, param in encoder.named_parameters():
        param.data = weight * checkpoint[name] + (1 - weight) * param.data


def released_schedule(epochs, reinit_epoch, reinit_num):
    """main, L378-427: the epochs after whose training a re-init runs."""
    flag, after = 0, []
    for epoch in range(epochs):
        if (epoch % reinit_epoch == 0) & (epoch > 0):
            flag += 1
            if flag <= reinit_num:
                after.append(epoch)
    return after


# The rule on hand-built inputs


def test_purity_is_the_released_majority_vote_share():
    labels = np.array([0, 0, 1, 1, 2, 2])
    clusters = np.array([0, 0, 0, 1, 1, 1])  # majorities 2 of 3 and 2 of 3
    assert purity(labels, clusters) == pytest.approx(4 / 6) == released_purity(labels, clusters)
    labels = np.array([2, 2, 0, 0, 2])  # class 1 missing: the released remap changes nothing
    clusters = np.array([5, 5, 5, 1, 1])  # 2 of 3, then a 1-1 tie: 1 of 2
    assert purity(labels, clusters) == pytest.approx(3 / 5) == released_purity(labels, clusters)
    assert purity(labels, np.arange(5)) == 1.0 == released_purity(labels, np.arange(5))


def test_strength_is_tanh_of_lambda_times_the_purity_gap():
    assert reinit_strength(0.9, 0.6, 3.0) == pytest.approx(np.tanh(0.9))  # 0.7163
    assert reinit_strength(0.6, 0.9, 3.0) == reinit_strength(0.9, 0.6, 3.0)  # |gap|
    for train_p, val_p, lam in [(0.9, 0.6, 3.0), (0.55, 0.5, 3.0), (0.8, 0.2, 10.0)]:
        assert reinit_strength(train_p, val_p, lam) == \
            released_weight(train_p, val_p, lam).item()
    assert reinit_strength(0.7, 0.7, 3.0) == 0.0  # no gap: the encoder is kept


def test_cluster_purity_is_the_released_kmeans_on_scaled_features():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 15)
    centers = rng.normal(0, 1, (4, 8)) * np.array([1, 5, 0.2, 3, 1, 1, 9, 1])  # uneven scales
    features = (centers[labels] + rng.normal(0, 1.5, (60, 8))).astype(np.float32)
    ours = cluster_purity(features, labels, 4, n_init=1)
    assert 0.25 <= ours <= 1.0
    assert ours == released_split_purity(features, labels, 4)  # scikit-learn >= 1.4's default
    assert cluster_purity(features, labels, 4, n_init=10) == \
        released_split_purity(features, labels, 4, n_init=10)  # scikit-learn < 1.4's


def test_soft_reinit_moves_every_parameter_as_released_and_keeps_the_buffers():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.LazyLinear(3))
    encoder(torch.randn(4, 1, 5, 5))  # materialize the linear layer, move the running stats
    initial = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn_like(p))
    encoder(torch.randn(4, 1, 5, 5))
    buffers = {n: b.clone() for n, b in encoder.named_buffers()}
    released = copy.deepcopy(encoder)
    released_reinit(released, initial, released_weight(0.9, 0.6, 3.0))
    soft_reinit(encoder, initial, reinit_strength(0.9, 0.6, 3.0))
    for (name, ours), theirs in zip(encoder.named_parameters(), released.parameters()):
        assert torch.equal(ours, theirs), name
        assert not torch.equal(ours, initial[name])
    assert all(torch.equal(b, buffers[n]) for n, b in encoder.named_buffers())
    soft_reinit(encoder, initial, 1.0)  # strength 1: back to the initial weights
    assert all(torch.equal(p, initial[n]) for n, p in encoder.named_parameters())


@pytest.mark.parametrize("epochs,reinit_epoch,reinit_num", [(90, 20, 3), (41, 20, 3), (90, 20, 0),
                                                            (10, 1, 3), (61, 20, 5)])
def test_schedule_is_the_released_loop_one_epoch_later(epochs, reinit_epoch, reinit_num):
    """The re-init after released epoch e is the start of epoch e + 1; one after the last
    epoch changes no trained or evaluated model, so it is not scheduled."""
    expected = [e + 1 for e in released_schedule(epochs, reinit_epoch, reinit_num)
                if e + 1 < epochs]
    assert diagnosis_epochs(reinit_epoch, reinit_num, epochs) == expected
    assert diagnosis_epochs(20, 3, 90) == [21, 41, 61]  # ours.sh's CREMA-D setting


# The method on real features


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("relearning"),
                              counts={"train": 12, "val": 6, "test": 3}, size=16, steps=16)


def run_data(root):
    cfg = DataConfig(path=str(root), batch_size=4, workers=0)
    return RunData(open_dataset(str(root)), cfg, seed=0, device=torch.device("cpu"))


def released_diagnosis(model, data, move_lambda=3.0):
    """get_feature (L300-324) on train and val, then reinit_score's weight per modality."""
    def get_feature(split):
        model.eval()
        feats, labels = {m: [] for m in model.modalities}, []
        with torch.no_grad():
            for batch in data.batches(split, train=False):
                encoded = model.encode_all(batch.inputs)
                for m in model.modalities:
                    feats[m].append(encoded[m].pooled.data.cpu())
                labels.append(batch.label.cpu())
        return {m: torch.cat(v).numpy() for m, v in feats.items()}, torch.cat(labels).numpy()

    (train_f, train_y), (val_f, val_y) = get_feature("train"), get_feature("val")
    return {m: released_weight(released_split_purity(train_f[m], train_y, 3),
                               released_split_purity(val_f[m], val_y, 3), move_lambda)
            for m in model.modalities}


def train_epoch(method, model, data, step, epoch):
    method.begin_epoch(epoch)
    method.before_epoch(model, data)
    model.train()
    for batch in data.batches("train", train=True, epoch=epoch):
        method.train_step(model, batch, step)


def test_before_epoch_keeps_the_initial_encoders_then_reinitializes_as_released(tiny):
    data = run_data(tiny)
    method, _ = build_pair("relearning", reinit_epoch=1, reinit_num=1)  # 3 epochs: at epoch 2
    torch.manual_seed(0)
    model = method.build_model(data.dataset.modalities, 3, TINY)
    step = Step(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9))
    initial = copy.deepcopy(model.state_dict())
    train_epoch(method, model, data, step, 0)
    assert all(torch.equal(method.initial[m][n], initial[f"encoders.{m}.{n}"])
               for m in model.modalities for n in method.initial[m])
    train_epoch(method, model, data, step, 1)
    assert method.strengths == {"audio": 0.0, "video": 0.0}  # no diagnosis before epoch 2
    weights = released_diagnosis(model, data)
    released = copy.deepcopy(model)
    for m, w in weights.items():
        released_reinit(released.encoders[m], {n[len(f"encoders.{m}."):]: v
                                               for n, v in initial.items()
                                               if n.startswith(f"encoders.{m}.")}, w)
    method.begin_epoch(2)
    method.before_epoch(model, data)
    assert method.strengths == pytest.approx({m: w.item() for m, w in weights.items()})
    assert any(w > 0 for w in method.strengths.values())  # the tiny run does re-initialize
    ours, theirs = model.state_dict(), released.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # buffers and head untouched too
    assert method.initial == {}  # the last diagnosis: the initial weights are dropped
    assert method.state_dict() == {"initial": {}}


def test_a_diagnosis_needs_a_val_split_with_a_sample_per_class(tmp_path):
    small = write_tiny_dataset(tmp_path / "small", counts={"train": 8, "val": 2, "test": 2},
                               size=16, steps=16)
    method, model = build_pair("relearning", reinit_epoch=1, reinit_num=1)
    method.begin_epoch(0)
    with pytest.raises(CcatError, match=r"clusters the 'val' split of .* \(2 samples\) into "
                                        r"its 3 classes and needs at least 3"):
        method.before_epoch(model, run_data(small))
    unscheduled, model = build_pair("relearning")  # 3 epochs, no diagnosis: nothing to check
    unscheduled.begin_epoch(0)
    unscheduled.before_epoch(model, run_data(small))
    assert unscheduled.initial == {}


def test_train_step_is_concats_step_and_logs_the_epochs_strength():
    ours, model, step = build_with_step("relearning")
    concat, concat_model, concat_step = build_with_step("concat")
    ours.strengths = {"audio": 0.25, "video": 0.0}
    out = ours.train_step(model, random_batch(), step)
    expected = concat.train_step(concat_model, random_batch(), concat_step)
    assert out == {**expected, "reinit/audio": 0.25, "reinit/video": 0.0}
    assert step.grads[0].keys() == concat_step.grads[0].keys()
    assert all(torch.equal(g, concat_step.grads[0][n]) for n, g in step.grads[0].items())


def test_state_round_trips_the_initial_encoders():
    method, model = build_pair("relearning", reinit_epoch=1, reinit_num=1)
    method.initial = {m: {n: p.detach().clone() for n, p in model.encoders[m].named_parameters()}
                      for m in model.modalities}
    restored, _ = build_pair("relearning", reinit_epoch=1, reinit_num=1)
    restored.load_state_dict(method.state_dict())
    assert restored.initial.keys() == method.initial.keys()
    assert all(torch.equal(restored.initial[m][n], v) for m, p in method.initial.items()
               for n, v in p.items())


def test_a_run_resumed_at_the_reinit_epoch_ends_as_the_uninterrupted_one(tmp_path, monkeypatch):
    data = write_tiny_dataset(tmp_path / "data", counts={"train": 8, "val": 3, "test": 2},
                              size=16, steps=16)
    params = {"reinit_epoch": 1, "reinit_num": 1}  # diagnosis at the start of the third epoch
    cfg = tiny_config(data, tmp_path / "full", method="relearning", epochs=3)
    cfg.method.params = params
    train(cfg)
    cfg.out = str(tmp_path / "cut")
    interrupt_then_resume(cfg, monkeypatch, at_epoch=3)  # resumed from epoch 2's checkpoint
    full, cut = (torch.load(tmp_path / run / "last.pt", weights_only=True)
                 for run in ("full", "cut"))
    assert all(torch.equal(full["model"][k], cut["model"][k]) for k in full["model"])
    assert full["method_state"] == {"initial": {}}  # dropped after the last diagnosis
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text()
            .splitlines()]
    assert [any(r[f"reinit/{m}"] > 0 for m in ("audio", "video")) for r in rows] == \
        [False, False, True]
