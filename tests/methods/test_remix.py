"""Data Remixing: the released assignment rule and losses on hand-built tensors, an epoch that
trains every sample of the loader's epoch exactly once in its assigned modality's
single-modality batches, and an exact resume of a remixed epoch (issue 26)."""

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ccat.methods.remix import Remix, assign
from ccat.train import train
from method_helpers import build_released
from train_helpers import interrupt_then_resume, random_batch, tiny_config, write_tiny_dataset


def kl_divergence(predictions, num_classes):
    """MatthewMaxy/Remix_ICML2025 80898aa0, train.py:52-57, written out."""
    uniform_distribution = np.full(num_classes, 1.0 / num_classes)
    predictions = np.clip(predictions, 1e-9, 1.0)
    kl_div = np.sum(predictions * np.log2(predictions / uniform_distribution))
    return kl_div


def released_assignment(out_audio, out_video):
    """train.py:70-81: 0 (audio subset) where KL_audio < KL_video, else 1 (video subset)."""
    softmax = torch.nn.Softmax(dim=1)
    pred_v, pred_a = softmax(out_video), softmax(out_audio)
    subsets = []
    for i in range(len(out_audio)):
        KL_audio = kl_divergence(pred_a[i].cpu().data.numpy(), 6)
        KL_video = kl_divergence(pred_v[i].cpu().data.numpy(), 6)
        subsets.append(0 if KL_audio < KL_video else 1)
    return subsets


def test_remix_assigns_each_sample_as_the_released_code():
    gen = torch.Generator().manual_seed(0)
    audio = torch.randn(40, 6, generator=gen) * torch.linspace(0.1, 5, 40)[:, None]
    video = torch.randn(40, 6, generator=gen) * torch.linspace(5, 0.1, 40)[:, None]
    audio[0], video[0] = torch.zeros(6), torch.zeros(6)  # a tie goes to video
    audio[1, 0], video[1, 0] = 60.0, 40.0  # both saturate: the clip at 1e-9 decides
    ours = assign(audio, video).tolist()
    assert ours == released_assignment(audio, video)
    assert ours[0] == 1 and 0 < sum(ours) < 40


def test_remix_losses_equal_the_released_code():
    method, model, step = build_released("remix")
    batch = random_batch()
    label, (first, second) = batch.label, model.modalities
    a = model.encode(batch.inputs, first).pooled
    v = model.encode(batch.inputs, second).pooled
    head, head_audio, head_video = (model.classifier, model.unimodal_heads[first],
                                    model.unimodal_heads[second])
    # train.py:115-120 (warm-up, alpha = beta = 0.5)
    warm = F.cross_entropy(head(torch.cat((a, v), 1)), label) + \
        0.5 * F.cross_entropy(head_audio(a), label) + 0.5 * F.cross_entropy(head_video(v), label)
    method.begin_epoch(0)
    assert method.train_step(model, batch, step)["loss"] == pytest.approx(warm.item(), rel=1e-5)
    # train.py:144-147 and models.py:55-56: a video batch, the audio features zeroed
    video = F.cross_entropy(head(torch.cat((torch.zeros_like(a), v), 1)), label) + \
        1.0 * F.cross_entropy(head_video(v), label)
    assert method.update(model, batch, second, step) == pytest.approx(video.item(), rel=1e-5)
    # train.py:163-166: an audio batch, gamma2 = 1
    audio = F.cross_entropy(head(torch.cat((a, torch.zeros_like(v)), 1)), label) + \
        1.0 * F.cross_entropy(head_audio(a), label)
    assert method.update(model, batch, first, step) == pytest.approx(audio.item(), rel=1e-5)
    trained = [{n.split(".")[0] + "." + n.split(".")[1] for n in g} for g in step.grads[1:]]
    assert trained[0] == {"encoders.video", "classifier.weight", "classifier.bias",
                          "unimodal_heads.video"}
    assert trained[1] == {"encoders.audio", "classifier.weight", "classifier.bias",
                          "unimodal_heads.audio"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("remix"),
                              counts={"train": 8, "val": 2, "test": 2}, size=16, steps=16)


def remix_config(tiny, out):
    cfg = tiny_config(tiny, out, method="remix", epochs=2)
    cfg.data.batch_size = 3  # 8 samples: the loader's epoch is 2 batches, 2 samples dropped
    cfg.method.params = {"warmup": 1}  # epoch 2 is remixed
    return cfg


def test_remix_epoch_trains_each_sample_of_the_loaders_epoch_once_in_its_modality(
        tiny, tmp_path, monkeypatch):
    streamed, updates, assignments = [], [], []
    real_step, real_update = Remix.train_step, Remix.update

    def train_step(self, model, batch, step):
        if self.remixing():
            streamed.extend(batch.index.tolist())
            assignments.append(self.assignment.clone())
        return real_step(self, model, batch, step)

    def update(self, model, batch, modality, step):
        updates.append((modality, batch.index.tolist(), set(batch.inputs)))
        return real_update(self, model, batch, modality, step)

    monkeypatch.setattr(Remix, "train_step", train_step)
    monkeypatch.setattr(Remix, "update", update)
    history = train(remix_config(tiny, tmp_path / "run"))
    assert len(streamed) == 6  # the loader's epoch: 2 full batches of 3
    trained = [i for _, index, _ in updates for i in index]
    assert Counter(trained) == Counter(streamed) and len(set(trained)) == 6  # each once
    assignment = assignments[0]
    assert len(assignment) == 8 and set(assignment.tolist()) <= {0, 1}
    modalities = ["audio", "video"]
    for modality, index, inputs in updates:
        assert inputs == {modality}  # a single-modality batch
        assert all(modalities[assignment[i]] == modality for i in index)
    sizes = [len(index) for _, index, _ in updates]  # full batches; the last two may be short
    assert all(s == 3 for s in sizes[:-2]) and all(0 < s <= 3 for s in sizes)
    assert history[1]["updates/audio"] + history[1]["updates/video"] == len(updates) / 2


def test_remix_resume_of_a_remixed_epoch_equals_the_uninterrupted_run(tiny, tmp_path,
                                                                       monkeypatch):
    train(remix_config(tiny, tmp_path / "full"))
    cfg = remix_config(tiny, tmp_path / "cut")
    interrupt_then_resume(cfg, monkeypatch, at_epoch=2)
    full, cut = (torch.load(tmp_path / run / "last.pt", weights_only=True)
                 for run in ("full", "cut"))
    assert all(torch.equal(full["model"][k], cut["model"][k]) for k in full["model"])
